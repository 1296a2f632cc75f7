"""The task plumbing every task shares: multi-label label tables through ingest, a task's own
config section in the stage settings, the registry of tasks, and findings of a DICOM SR row."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from haven.config import schema, stage_settings, validate
from haven.ingest import ingest
from haven.learn.tasks import TASKS, get_task
from haven.predict.sr import findings


def _images(src: Path, names) -> None:
    src.mkdir(parents=True)
    for name in names:
        Image.new("L", (6, 6), 40).save(src / name)


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_finding_columns_become_one_self_describing_label(tmp_path):
    _images(tmp_path / "src", ("a.png", "b.png", "c.png"))
    table = tmp_path / "t.csv"
    table.write_text("path,patient,epidural,subdural,any\na.png,P1,0,1,1\nb.png,P2,0,0,0\nc.png,P3,,,\n")
    summary = ingest(tmp_path / "src", tmp_path / "out", labels=table, label_key="path",
                     label_column=["epidural", "subdural", "any"])
    rows = _manifest(tmp_path / "out")
    assert rows["a.png"]["label"] == "epidural=0;subdural=1;any=1"
    assert rows["b.png"]["label"] == "epidural=0;subdural=0;any=0"
    assert "c.png" not in rows and summary["quarantined"] == 1  # a row left empty is no label


@pytest.mark.parametrize("body, words", [
    ("a.png,P1,0,2,1\n", ("row 2", "'subdural'", "'2'", "0 or 1")),
    ("a.png,P1,0,,1\n", ("row 2", "some finding columns are empty")),
])
def test_a_bad_finding_cell_is_refused_naming_file_row_and_fix(tmp_path, body, words):
    _images(tmp_path / "src", ("a.png",))
    table = tmp_path / "t.csv"
    table.write_text("path,patient,epidural,subdural,any\n" + body)
    with pytest.raises(ValueError) as e:
        ingest(tmp_path / "src", tmp_path / "out", labels=table, label_key="path",
               label_column=["epidural", "subdural", "any"])
    assert str(table) in str(e.value) and all(w in str(e.value) for w in words)


def test_a_missing_finding_column_is_named(tmp_path):
    _images(tmp_path / "src", ("a.png",))
    table = tmp_path / "t.csv"
    table.write_text("path,epidural,any\na.png,0,1\n")
    with pytest.raises(ValueError, match="no column 'subdural'"):
        ingest(tmp_path / "src", tmp_path / "out", labels=table, label_key="path",
               label_column=["epidural", "subdural", "any"])


def test_the_task_section_travels_with_the_stages_that_learn():
    config = validate({"projects": {
        "dr": {"source": ".", "task": "ordinal", "ordinal": {"grades": 4, "referable": 3}},
        "plain": {"source": "."}}}, "test")
    s = stage_settings(config, "dr", "evaluate")
    assert s["task"] == "ordinal" and s["task_options"] == {"grades": 4, "method": "corn", "referable": 3}
    assert stage_settings(config, "plain", "train")["task_options"] == {}  # classification has no section
    other = validate({"projects": {"dr": {"source": ".", "task": "ordinal", "ordinal": {"grades": 5}}}}, "test")
    # a changed task option is a changed stage (its config hash, so Snakemake reruns it)
    assert stage_settings(other, "dr", "train")["config_hash"] != stage_settings(config, "dr", "train")["config_hash"]
    assert "task_options" not in stage_settings(config, "dr", "anonymize")


def test_every_configured_task_is_registered_and_an_unknown_one_is_named():
    project = schema()["$defs"]["project"]["properties"]
    assert set(TASKS) == set(project["task"]["enum"])  # a task the config offers has its module
    assert get_task("ordinal", {"grades": 5}).options == {"grades": 5}
    with pytest.raises(ValueError, match="unknown task 'detection'.*set `task:`"):
        get_task("detection")


def test_sr_findings_state_the_predicted_class_or_every_finding():
    single = {"p_normal": "0.2", "p_hemorrhage": "0.8", "pcal_normal": "0.3", "pcal_hemorrhage": "0.7",
              "predicted": "hemorrhage"}
    assert findings(single) == [("hemorrhage", 0.7)]
    multi = {"p_subdural": "0.9", "p_any": "0.95", "pcal_subdural": "0.8", "pcal_any": "0.9",
             "predicted": "subdural+any"}
    every = get_task("multilabel").reports_every_class
    assert every and not get_task("classification").reports_every_class
    assert findings(multi, every) == [("subdural", 0.8), ("any", 0.9)]
    # one finding predicted, or none: the report still states every finding
    assert findings({**multi, "predicted": "any"}, every) == findings({**multi, "predicted": "none"}, every) \
        == [("subdural", 0.8), ("any", 0.9)]
    grade = {"p_0": "0.1", "p_1": "0.7", "p_2": "0.2", "pcal_1": "0.6", "p_referable": "0.2", "predicted": "1"}
    assert findings(grade, get_task("ordinal").reports_every_class) == [("1", 0.6)]


def test_a_multilabel_split_is_stratified_on_its_summary_finding():
    """Every row's finding combination is unique here, so stratifying on the whole label would
    fall back to an unstratified split; on `any` each split gets its share of positives."""
    import pandas as pd

    from haven.learn.preprocess import split_patients

    rows = []
    for i in range(40):
        positive = i % 2
        combo = ";".join(f"f{j}={(i >> j) & 1 if positive else 0}" for j in range(5))
        rows.append({"patient": f"P{i}", "label": f"{combo};any={positive}"})
    manifest = pd.DataFrame(rows)
    task = get_task("multilabel", {"summary_label": "any"})
    split = split_patients(manifest, 0.25, 0.25, seed=3, strata=task.strata)
    positive = manifest.set_index("patient")["label"].str.endswith("any=1")
    for name in ("train", "val", "test"):
        share = positive[split[split == name].index].mean()
        assert share == 0.5, (name, share)


def test_only_a_segmentation_carries_its_mask_files_through_the_gate():
    from haven.config import stage_settings, validate

    config = validate({"projects": {
        "seg": {"source": ".", "task": "segmentation", "segmentation": {"masks": "data/masks"}},
        "dr": {"source": ".", "task": "ordinal"}}}, "test")
    for stage in ("ingest", "anonymize"):
        assert stage_settings(config, "seg", stage)["masks"] == {"folder": "data/masks", "suffix": "_mask"}
        assert stage_settings(config, "dr", stage)["masks"] is None
        assert "task_options" not in stage_settings(config, "seg", stage)
    assert stage_settings(config, "seg", "preprocess")["task_options"]["classes"] == ["background", "lesion"]
