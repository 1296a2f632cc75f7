"""One settings builder: a stage run by its rule and the same stage run by hand get equal settings."""

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from haven.cli import common as cli_common
from haven import config as cfg

# `haven <command> [<stage>] ... --params '<json>'` as `snakemake -n -p` prints it
_COMMAND = re.compile(r"^\s*(?:Shell command: )?haven (\w+) (.*--params .*)$")


@pytest.fixture(scope="module")
def rule_settings(root, tmp_path_factory):
    """Every `--params` the rules of the embedded default config pass, by (stage, project)."""
    work = tmp_path_factory.mktemp("dry")
    shutil.copy(root / "config.yaml", work / "config.yaml")
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(work),
                          "-n", "-p", "--forceall"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    found = {}
    for line in run.stdout.splitlines():
        m = _COMMAND.match(line)
        if not m:
            continue
        words = shlex.split(m.group(2).split(">")[0])
        params = json.loads(words[words.index("--params") + 1])
        stage = words[0] if m.group(1) == "merge" else m.group(1)
        found[(stage, params.get("project"))] = params
    return found


def _by_hand(root, command: str, project: str | None) -> dict:
    args = argparse.Namespace(command=command, params=None, config=str(root / "config.yaml"), project=project)
    return cli_common.settings(args)


def test_every_stage_of_every_demo_project_gets_the_same_settings_by_hand(root, rule_settings):
    # the gate stages also run on each project's predict source (the dataset <project>/predict/new),
    # and reidentify only there; `--project digits/predict/new` by hand gets the same settings;
    # the cross-validation stages (folds, ensemble) run for the cross-validated projects only
    gate = ("ingest", "anonymize", "audit", "reidentify")
    conf = cfg.load(root / "config.yaml")
    projects = list(conf["projects"])
    cv = [p for p in projects if cfg.cv_folds(conf["projects"][p])]
    assert cv, "the embedded config should cross-validate one project (the DAG tests run it)"
    datasets = [cfg.dataset_name(p, "new") for p in projects]
    expected = {(stage, p) for stage in cfg.STAGE_SECTIONS if stage not in ("reidentify", "folds", "ensemble")
                for p in projects}
    expected |= {(stage, d) for stage in gate for d in datasets}
    expected |= {(stage, p) for stage in ("folds", "ensemble") for p in cv}
    assert expected <= set(rule_settings), sorted(expected - set(rule_settings))
    for stage, project in sorted(expected):
        by_hand = _by_hand(root, stage, project)
        assert by_hand == rule_settings[(stage, project)], (stage, project)
    # so the lineage tag is one value per stage: the digits train stage hashes model + train only
    assert _by_hand(root, "train", "digits")["config_hash"] == rule_settings[("train", "digits")]["config_hash"]


def test_compare_gets_the_same_settings_by_hand(root, rule_settings):
    assert rule_settings[("compare", None)] == cfg.compare_settings(cfg.load(root / "config.yaml"))


def test_a_stage_by_hand_without_a_config_gets_the_schema_defaults():
    s = cfg.default_settings("ingest", "some/folder")
    assert (s["labels"], s["label_key"], s["label_column"]) == (None, "patient_id", "label")
    assert cfg.default_settings("audit")["anonymize"]["pixels"]["clean"] == "auto"


def test_the_config_hash_covers_only_the_stage_sections(root):
    conf = cfg.load(root / "config.yaml")
    train = cfg.stage_settings(conf, "digits", "train")
    conf["projects"]["digits"]["evaluate"]["bootstrap"] += 1  # a section train does not read
    assert cfg.stage_settings(conf, "digits", "train")["config_hash"] == train["config_hash"]
    conf["projects"]["digits"]["train"]["epochs"] += 1
    assert cfg.stage_settings(conf, "digits", "train")["config_hash"] != train["config_hash"]
