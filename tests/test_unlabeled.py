"""Unlabeled data (a project's predict sources, `unlabeled: true`): no label is taken from folder names,
which in a hospital export name patients and would be carried into the safe haven."""

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

from bundles import ct_files  # noqa: E402

from haven import config as cfg  # noqa: E402
from haven.ingest import ingest  # noqa: E402


def test_folder_names_are_no_labels_of_unlabeled_data(tmp_path):
    src = tmp_path / "export"
    ct_files(src / "DOE_JANE_HOSP990001", 2)
    ingest(src, tmp_path / "with", labels_required=False)
    ingest(src, tmp_path / "without", labels_required=False, label_folders=False)
    labelled = pd.read_csv(tmp_path / "with" / "manifest.csv", dtype=str, keep_default_na=False)
    unlabeled = pd.read_csv(tmp_path / "without" / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(labelled["label"]) == {"DOE_JANE_HOSP990001"}  # what a class-folder project would do
    assert len(unlabeled) == 2 and set(unlabeled["label"]) == {""}


def test_a_predict_source_is_an_unlabeled_dataset_ending_at_the_audit(root):
    config = cfg.load(root / "config.yaml")
    name = cfg.dataset_name("brain-ct", "new")
    assert name in cfg.datasets(config)
    s = cfg.stage_settings(config, name, "ingest")
    assert s["unlabeled"] and s["labels"] is None and s["until"] == "audit"
    # the gate runs with the project's own de-identification settings and key
    assert cfg.stage_settings(config, name, "anonymize")["anonymize"] == \
        cfg.stage_settings(config, "brain-ct", "anonymize")["anonymize"]
    assert cfg.project(config, name)["source"] == "data/demo/brain-ct-new/dicom"
