import copy
import subprocess
import sys

import pytest
import yaml

from haven import config as cfg


def test_default_config_validates_and_fills_defaults(root):
    conf = cfg.load(root / "config.yaml")
    digits = conf["projects"]["digits"]
    assert digits["train"]["label_smoothing"] == 0.05  # a schema default, not in config.yaml
    assert conf["projects"]["brain-ct"]["preprocess"]["mode"] == "ct"
    assert len(conf["projects"]["brain-ct"]["preprocess"]["windows"]) == 3


def test_invalid_config_names_the_key(root, tmp_path):
    conf = yaml.safe_load((root / "config.yaml").read_text())
    bad = copy.deepcopy(conf)
    bad["projects"]["digits"]["train"]["epochs"] = "ten"
    bad["projects"]["brain-ct"]["tune"]["search_space"]["lr"]["type"] = "gaussian"
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate(bad)
    msg = str(err.value)
    assert "projects.digits.train.epochs" in msg
    assert "projects.brain-ct.tune.search_space.lr.type" in msg


def test_unknown_key_rejected():
    with pytest.raises(cfg.ConfigError, match="projects.x"):
        cfg.validate({"projects": {"x": {"source": "a", "modle": {}}}})


def test_snakemake_rejects_invalid_config_at_dag_start(root, tmp_path):
    conf = yaml.safe_load((root / "config.yaml").read_text())
    conf["projects"]["digits"]["preprocess"]["size"] = 2  # minimum is 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(conf))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(bad)],
                         cwd=root, capture_output=True, text=True)
    assert out.returncode != 0
    assert "size" in out.stderr + out.stdout


def test_dry_run_and_lint_are_clean(root):
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--quiet", "rules"],
                         cwd=root, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=root, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Congratulations" in lint.stdout + lint.stderr


def test_a_predict_source_of_a_segmentation_project_looks_for_no_masks():
    """The training source's mask folder is not the new patients': their ingest ran before the training
    data existed and stopped on "mask folder ... is not a folder" (found by a brain-mri trial run)."""
    config = cfg.validate({"projects": {"seg": {
        "source": "train", "task": "segmentation", "segmentation": {"classes": ["background", "lesion"],
                                                                     "masks": "train/derivatives/lesions"},
        "predict": {"sources": {"new": {"source": "new"}}}}}})
    assert cfg.stage_settings(config, "seg", "ingest")["masks"]["folder"] == "train/derivatives/lesions"
    assert cfg.stage_settings(config, "seg/predict/new", "ingest")["masks"] is None
    assert cfg.stage_settings(config, "seg/predict/new", "anonymize")["masks"] is None
