"""Integration: the whole demo DAG, run for real by Snakemake in a temporary directory."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
import zarr

pytestmark = pytest.mark.integration


def snakemake(root: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def demo(root, tmp_path_factory):
    """Run the embedded default config, with shorter training, end to end."""
    work = tmp_path_factory.mktemp("demo")
    conf = yaml.safe_load((root / "config.yaml").read_text())
    conf["projects"]["brain-ct"]["shards"] = 2  # ingest and anonymize as two jobs each
    for p in conf["projects"].values():
        p["train"]["epochs"] = 3
        p["tune"]["num_samples"] = 3
        p["tune"]["max_epochs"] = 2
    (work / "config.yaml").write_text(yaml.safe_dump(conf))
    run = snakemake(root, work)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    return work, conf


def test_audit_passed_for_every_project(demo):
    work, conf = demo
    for name in conf["projects"]:
        audit = json.loads((work / "results" / name / "anonymize" / "audit.json").read_text())
        assert audit["passed"] and audit["files"] > 0 and not audit["findings"]


def test_bad_files_were_quarantined_not_fatal(demo):
    work, _ = demo
    for name in ("digits", "brain-ct"):
        q = pd.read_csv(work / "results" / name / "ingest" / "quarantine.csv")
        assert len(q) >= 1 and q["reason"].str.len().min() > 0


def test_shards_have_split_sizes_and_no_patient_overlap(demo):
    work, conf = demo
    for name in conf["projects"]:
        pre = work / "results" / name / "preprocess"
        stats = json.loads((pre / "stats.json").read_text())
        splits = pd.read_csv(pre / "splits.csv")
        assert splits.groupby("patient")["split"].nunique().max() == 1
        patients = {s: set(zarr.open_group(pre / f"{s}.zarr", mode="r")["patient"][:]) for s in ("train", "val", "test")}
        assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
        assert not (patients["val"] & patients["test"])
        for s in ("train", "val", "test"):
            g = zarr.open_group(pre / f"{s}.zarr", mode="r")
            assert g["images"].shape[0] == stats["samples"][s] == (splits["split"] == s).sum() > 0
    assert json.loads((work / "results/digits/preprocess/stats.json").read_text())["samples"]["train"] > 1000


def test_models_learn(demo):
    work, _ = demo
    digits = json.loads((work / "results/digits/evaluate/metrics.json").read_text())
    assert digits["accuracy"] > 0.6  # chance is ~0.1
    ct = json.loads((work / "results/brain-ct/evaluate/metrics.json").read_text())
    assert ct["n"] > 0 and ct["roc_auc"] is not None
    subtypes = json.loads((work / "results/brain-ct-subtypes/evaluate/metrics.json").read_text())
    assert subtypes["macro_roc_auc"] is not None and subtypes["weighted_log_loss"] > 0
    lesions = json.loads((work / "results/brain-ct-lesions/evaluate/metrics.json").read_text())
    lo, hi = lesions["ci"]["dice_present"]
    assert lo <= lesions["dice_present"] <= hi and lesions["dice_present"] > lesions["all_background_dice"] - 0.5
    masks = work / "results/brain-ct-lesions/predict/new/masks"
    assert len(list(masks.rglob("*.seg.dcm"))) == len(list(masks.rglob("*.png"))) >= 40  # a mask per new slice
    retina = json.loads((work / "results/retinopathy/evaluate/metrics.json").read_text())
    assert retina["qwk"] is not None and retina["ci"]["qwk"][0] <= retina["qwk"] <= retina["ci"]["qwk"][1]


def test_mlflow_has_tune_and_train_runs_per_project(demo):
    import mlflow

    work, conf = demo
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'results/mlflow/mlflow.db'}")
    for name in conf["projects"]:
        exp = client.get_experiment_by_name(f"haven-{name}")
        runs = client.search_runs([exp.experiment_id])
        stages = [r.data.tags.get("haven.stage") for r in runs]
        folds = conf["projects"][name].get("cv", {}).get("folds", 0)
        assert stages.count("train") == max(folds, 1) and stages.count("tune") >= 1
        # the project's model: its train run, or a cross-validated project's ensemble run
        final = client.get_run(json.loads((work / "results" / name / "train" / "run.json").read_text())["mlflow_run_id"])
        assert final.data.tags["haven.stage"] == ("ensemble" if folds else "train")
        tune = next(r for r in runs if r.data.tags.get("haven.stage") == "tune" and "mlflow.parentRunId" not in r.data.tags)
        from haven.learn.tasks import get_task

        # the task's own headline (a segmentation has no balanced accuracy: its Dice on lesion slices)
        assert f"test_{get_task(conf['projects'][name].get('task', 'classification')).test_metric}" in final.data.metrics
        assert any(k.startswith("best_val_") for k in final.data.metrics)
        assert final.data.tags["haven.tune_run_id"] == tune.info.run_id
        for tag in ("haven.config_hash", "haven.data_manifest_hash", "haven.git_commit", "haven.snakemake_rule"):
            assert final.data.tags.get(tag), tag
        if folds:  # the fold runs are the ensemble's children, one per fold
            fold_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == final.info.run_id]
            assert sorted(r.data.tags["haven.fold"] for r in fold_runs) == [str(k) for k in range(folds)]
            assert f"cv_{next(k[5:] for k in final.data.metrics if k.startswith('best_val_'))}_sd" in final.data.metrics
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune.info.run_id]
        assert len(children) == conf["projects"][name]["tune"]["num_samples"]


def test_reports_and_second_run_is_a_no_op(root, demo):
    work, conf = demo
    for name in conf["projects"]:
        page = (work / "results" / name / "report" / "index.html").read_text()
        assert "audit" in page and "data:image/png;base64" in page
        assert (work / "results" / name / "report" / "model_card.md").is_file()
    again = snakemake(root, work, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    rep = snakemake(root, work, "--report", str(work / "report.html"))
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert (work / "report.html").stat().st_size > 10_000


def test_no_identifier_or_key_outside_the_phi_zone(demo):
    """Nothing downstream of ingest (outputs, logs, MLflow store) holds an original identifier or the key.

    Numbers only count as a whole number (a 9-digit accession may occur by chance inside a
    39-digit 2.25 UID), and dates only within their own patient's files: a shifted date that
    happens to equal another patient's real date reveals nothing.
    """
    import re

    import highdicom

    from haven.keys import pseudonym

    work, conf = demo
    key_text = (work / conf["key_file"]).read_text().strip()
    everywhere, dates_of, tag_of = {key_text}, {}, {key_text: "the key"}
    # text highdicom writes into every SEG it makes ("Software library used to create this
    # instance"): the demo's SEGs carry it, and so do the SEGs predict writes, from no input
    library = b"".join(p.read_bytes() for p in Path(highdicom.__file__).parent.rglob("*.py"))
    tables = [work / "results" / name / "ingest" / "identifiers.csv" for name in conf["projects"]]
    # the new patients' originals too (each project's predict source, its own PHI zone)
    tables += [work / "results" / name / "predict" / "new" / "ingest" / "identifiers.csv" for name in conf["projects"]]
    for table in tables:
        ids = pd.read_csv(table, dtype=str, keep_default_na=False)
        for patient, tag, value in zip(ids["patient_id"], ids["tag"], ids["value"]):
            if re.fullmatch(r"(19|20)\d{6}", value):
                dates_of.setdefault(pseudonym(key_text.encode(), patient), set()).add(value)
            elif len(value) >= 8 and value.encode() not in library:
                everywhere.add(value)
                tag_of.setdefault(value, tag)
    assert len(everywhere) > 20 and dates_of

    def holds(blob: bytes, values) -> str | None:
        for v in values:
            needle, at = v.encode(), blob.find(v.encode())
            while at >= 0:
                before, after = blob[at - 1:at], blob[at + len(needle):at + len(needle) + 1]
                if not v.isdigit() or not (before.isdigit() or after.isdigit()):
                    return v
                at = blob.find(needle, at + 1)
        return None

    leaks = []
    for path in (work / "results").rglob("*"):
        rel = path.relative_to(work / "results")
        if not path.is_file() or "ingest" in rel.parts:
            continue
        blob = path.read_bytes()
        found = holds(blob, everywhere)
        patient_dates = next((dates_of[p] for p in rel.parts if p in dates_of), None)
        if not found and patient_dates:
            found = holds(blob, patient_dates)
        if found:
            leaks.append(f"{rel} holds a value of {tag_of.get(found, 'a date')}")
    assert not leaks, leaks[:20]


def test_new_patients_are_predicted_through_the_gate_and_reported(demo):
    """Each project's held-back new patients (unlabeled, planted PHI): audited, predicted by the
    registered champion, joined back to their original ids in the PHI zone, shown on the page."""
    work, conf = demo
    for name in conf["projects"]:
        base = work / "results" / name / "predict" / "new"
        assert json.loads((base / "anonymize" / "audit.json").read_text())["passed"]
        table = pd.read_csv(base / "predictions.csv", dtype=str, keep_default_na=False)
        assert len(table) >= 40 and (table["status"] == "ok").all()
        summary = json.loads((base / "summary.json").read_text())
        assert summary["predicted"] == len(table) and summary["model"]["name"] == f"haven-{name}"
        assert summary["model"]["version"].isdigit()  # the registry's champion, not this run's file
        joined = pd.read_csv(base / "ingest" / "predictions.reidentified.csv", dtype=str, keep_default_na=False)
        assert len(joined) == len(table) and joined["patient_id"].str.len().min() > 0
        assert "Predictions on new data" in (work / "results" / name / "report" / "index.html").read_text()
    srs = list((work / "results" / "brain-ct" / "predict" / "new" / "ingest" / "sr").glob("*.dcm"))
    assert len(srs) == 12  # one per new patient's study
