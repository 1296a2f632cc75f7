"""The predict stage and test-time augmentation, for real: CT files with planted PHI de-identified
and audited by the pipeline's own gate (haven.deid.oneshot), one audited file damaged afterwards
(its pixels no longer decode), a small bundle applied by the stage and by `haven predict SRC DST`,
and the expected numbers computed without the bundle (training's load_sample, a bare forward)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundles import ct_bundle, ct_files  # noqa: E402

from haven import keys  # noqa: E402
from haven.cli import main  # noqa: E402
from haven.learn import tta  # noqa: E402
from haven.learn.preprocess import Inputs, load_sample  # noqa: E402
from haven.predict.bundle import Bundle  # noqa: E402

N = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from haven.deid.oneshot import deidentify
    from haven.predict.stage import predict

    tmp = tmp_path_factory.mktemp("predict")
    src = tmp / "export"
    files = ct_files(src, N)
    key_file = keys.create_key(tmp / "secret" / "haven.key")
    gate = deidentify(src, tmp / "out", keys.load_key(key_file), work=tmp / "phi")
    assert gate["audit_passed"] and gate["deidentified"] == N
    manifest = pd.read_csv(gate["manifest"], dtype=str, keep_default_na=False)
    # damage one audited file's pixel data (a disk fault after the audit): it must get a status row
    broken = manifest["file"].iloc[0]
    ds = pydicom.dcmread(Path(gate["data"]) / broken)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(Path(gate["data"]) / broken, enforce_file_format=True)
    model_pt, metrics = ct_bundle(tmp / "model")
    bundle = Bundle.load(model_pt, metrics, name="haven-ct", version="3")
    inputs = Inputs(Path(gate["manifest"]), Path(gate["audit"]), Path(gate["data"]))
    summary = predict(inputs, bundle, tmp / "out" / "predictions.csv", tmp / "out" / "summary.json")
    return {"src": src, "files": files, "gate": gate, "bundle": bundle, "inputs": inputs, "broken": broken,
            "table": pd.read_csv(tmp / "out" / "predictions.csv", dtype={"instance": str, "model_version": str}),
            "csv": tmp / "out" / "predictions.csv", "summary": summary, "model_pt": model_pt, "metrics": metrics,
            "key_file": key_file, "tmp": tmp}


def _forward(model, model_pt: Path, sample: np.ndarray) -> np.ndarray:
    """The network's probabilities on one uint8 sample, from first principles: the train stage's
    mean/std read from model.pt itself, no Bundle code."""
    meta = torch.load(model_pt, weights_only=False)
    x = torch.from_numpy(sample[None]).float() / 255.0
    x = (x - torch.tensor(meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(meta["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x), 1)[0].numpy()


def test_probabilities_are_the_training_preprocessing_and_the_bare_network(run):
    table, bundle = run["table"], run["bundle"]
    ok = table[table["status"] == "ok"]
    assert len(ok) == N - 1
    for _, row in ok.iterrows():
        # the sample exactly as the preprocess stage decodes a training file, with the bundle's pixels
        sample = load_sample(Path(run["gate"]["data"]) / row["file"], "dicom", bundle.pixels)
        assert sample.shape == (3, 32, 32) and sample.dtype == np.uint8
        direct = bundle.predict(sample[None])[0]
        np.testing.assert_allclose([row["p_normal"], row["p_hemorrhage"]],
                                   [direct["p_normal"], direct["p_hemorrhage"]], atol=1e-6)
        np.testing.assert_allclose([row["p_normal"], row["p_hemorrhage"]],
                                   _forward(bundle.model, run["model_pt"], sample), atol=1e-5)
        assert row["input_hash"] == direct["input_hash"]
        assert row["model"] == "haven-ct" and row["model_version"] == "3"
    # the inputs differ, so equal probabilities are not an accident of a constant model
    assert ok["p_hemorrhage"].nunique() == len(ok)


def test_an_undecodable_file_gets_a_status_row_and_the_others_are_predicted(run):
    table, summary = run["table"], run["summary"]
    assert len(table) == N
    bad = table[table["file"] == run["broken"]].iloc[0]
    assert bad["status"].startswith("not decoded")
    assert pd.isna(bad["p_hemorrhage"]) and pd.isna(bad["predicted"])
    assert (table.loc[table["file"] != run["broken"], "status"] == "ok").all()
    assert summary["files"] == N and summary["predicted"] == N - 1 and summary["not_decoded"] == 1
    assert sum(summary["per_class"].values()) == N - 1
    assert json.loads((run["tmp"] / "out" / "summary.json").read_text()) == summary


def test_the_decision_threshold_chosen_on_val_is_applied(run):
    from haven.predict.stage import run as run_stage

    bundle = run["bundle"]
    assert bundle.decision["rule"] == "threshold" and bundle.decision["calibrated"]
    ok = run["table"][run["table"]["status"] == "ok"]
    # a threshold between the observed calibrated scores: both sides must be populated
    cut = float(np.median(ok["pcal_hemorrhage"]))
    moved = Bundle(bundle.model, bundle.meta, {**bundle.evaluation, "decision": {**bundle.decision, "threshold": cut}},
                   name=bundle.name, version=bundle.version)
    table = run_stage(run["inputs"], moved)
    table = table[table["status"] == "ok"]
    expected = np.where(table["pcal_hemorrhage"] >= cut, "hemorrhage", "normal")
    assert list(table["predicted"]) == list(expected)
    assert set(expected) == {"hemorrhage", "normal"}
    # and the bundle's own threshold (0.4, not argmax's 0.5) in the stage's output
    for _, row in run["table"][run["table"]["status"] == "ok"].iterrows():
        assert (row["predicted"] == "hemorrhage") == (row["pcal_hemorrhage"] >= 0.4)


def test_no_original_identifier_in_the_predictions(run):
    text = run["csv"].read_text()
    for f in run["files"]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for value in (str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.SOPInstanceUID,
                      ds.StudyInstanceUID, ds.SeriesInstanceUID, f.name, f.stem):
            assert value not in text, value
    assert "export" not in text  # the source folder's name


def test_haven_predict_by_hand_gives_the_same_probabilities(run):
    dst = run["tmp"] / "by-hand"
    rc = main(["predict", str(run["src"]), str(dst), "--model", str(run["model_pt"]), "--evaluation",
               str(run["metrics"]), "--key-file", str(run["key_file"]), "--work", str(run["tmp"] / "phi2")])
    assert rc == 0
    by_hand = pd.read_csv(dst / "predictions.csv", dtype={"instance": str, "model_version": str})
    assert len(by_hand) == N and (by_hand["status"] == "ok").all()  # its copy of the source is intact
    stage = run["table"][run["table"]["status"] == "ok"].set_index("instance")
    joined = by_hand.set_index("instance").loc[stage.index]  # same key: the same pseudonymous instances
    for col in ("p_normal", "p_hemorrhage", "pcal_normal", "pcal_hemorrhage"):
        np.testing.assert_allclose(joined[col], stage[col], atol=1e-7)
    assert list(joined["predicted"]) == list(stage["predicted"])


# ---------------------------------------------------------------------------------------------
# test-time augmentation


class _Pool(torch.nn.Module):
    """A flip-invariant classifier: global mean and max of each channel, then a linear layer."""

    def __init__(self, c: int = 3, k: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(2 * c, k)

    def forward(self, x):
        return self.fc(torch.cat([x.mean((-2, -1)), x.amax((-2, -1))], 1))


class _Task:
    @staticmethod
    def scores(logits):
        return torch.softmax(logits, 1)


def test_tta_disabled_is_the_identity_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(4, 3, 16, 16)
    plain = torch.softmax(model(x), 1)
    for spec in (None, {}, {"enabled": False, "hflip": True, "vflip": True, "shift": 2}):
        assert tta.views(spec) == ["identity"]
        torch.testing.assert_close(tta.scores(model, x, _Task, spec), plain)
    # and enabled, a model that is not flip-invariant changes: the views are really averaged
    spec = {"enabled": True, "hflip": True, "shift": 0}
    assert tta.views(spec) == ["identity", "hflip"]
    assert not torch.allclose(tta.scores(model, x, _Task, spec), plain)


def test_tta_of_a_flip_invariant_model_equals_its_plain_scores():
    model = _Pool()
    x = torch.randn(4, 3, 16, 16)
    spec = {"enabled": True, "hflip": True, "vflip": True, "shift": 0}
    torch.testing.assert_close(tta.scores(model, x, _Task, spec), torch.softmax(model(x), 1))


def test_a_shift_view_moves_the_image_by_the_shift_and_repeats_the_edge():
    x = torch.arange(2 * 1 * 6 * 7, dtype=torch.float32).view(2, 1, 6, 7)
    right = tta.view(x, "right", 2)
    torch.testing.assert_close(right[..., 2:], x[..., :-2])
    torch.testing.assert_close(right[..., :2], x[..., :1].expand(-1, -1, -1, 2))
    down = tta.view(x, "down", 2)
    torch.testing.assert_close(down[..., 2:, :], x[..., :-2, :])
    torch.testing.assert_close(tta.view(x, "left", 1)[..., :-1], x[..., 1:])
    torch.testing.assert_close(tta.view(x, "up", 1)[..., :-1, :], x[..., 1:, :])
    assert tta.views({"enabled": True, "shift": 2}) == ["identity", "left", "right", "up", "down"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny trained project evaluated twice: TTA off (the schema's default) and on."""
    from test_evaluate import FAST, make_tiny_project

    from haven.config import section_defaults
    from haven.trust import evaluate as ev

    tmp = tmp_path_factory.mktemp("tta")
    root = make_tiny_project(tmp / "proj", train_steps=5)
    settings = {**section_defaults("evaluate"), **FAST, "bootstrap": 0, "attack_samples": 4, "epsilons": [0]}

    def once(name, spec):
        pre = root / "preprocess"
        return ev.evaluate(root / "train" / "model.pt", pre / "test.zarr", pre / "val.zarr",
                           ev.Outputs(metrics=tmp / name / "metrics.json"), settings=settings,
                           task="classification", seed=1, tta=spec)

    spec = {"enabled": True, "hflip": True, "vflip": False, "shift": 1}
    return {"root": root, "tmp": tmp, "plain": once("plain", section_defaults("tta")), "tta": once("tta", spec)}


def test_evaluate_reports_tta_beside_the_plain_metrics(evaluated):
    from haven.trust import evaluate as ev

    plain, with_tta = evaluated["plain"], evaluated["tta"]
    assert "tta" not in plain
    # the headline metrics stay the plain model's
    for k in ("accuracy", "balanced_accuracy", "roc_auc"):
        assert with_tta[k] == plain[k]
    rec = with_tta["tta"]
    assert rec["views"] == ["identity", "hflip", "left", "right", "up", "down"] and rec["shift"] == 1
    for k in ("accuracy", "balanced_accuracy", "roc_auc"):
        assert rec[k]["without"] == plain[k]
        assert rec[k]["delta"] == pytest.approx(rec[k]["with"] - rec[k]["without"])
    assert rec["roc_auc"]["with"] != rec["roc_auc"]["without"]  # the views changed the probabilities
    assert ev.flat_metrics(with_tta)["test_tta_accuracy"] == rec["accuracy"]["with"]
    assert json.loads((evaluated["tmp"] / "tta" / "metrics.json").read_text())["tta"] == rec


# ---------------------------------------------------------------------------------------------
# the report: predictions on new data, the decision rule, TTA


def test_report_shows_the_predictions_the_decision_and_tta(evaluated, run, tmp_path):
    import yaml

    from haven.report.artefacts import Inputs as ReportInputs, Outputs
    from haven.report.page import project_report

    metrics = evaluated["tta"]
    stats = {"classes": ["left", "right"], "channels": 1, "size": 24, "samples": {"test": 48},
             "patients": {"test": 24}, "per_class": {"test": {"left": 24, "right": 24}}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    (tmp_path / "audit.json").write_text(json.dumps({"files": 1, "findings": [], "passed": True}))
    (tmp_path / "best.yaml").write_text(yaml.safe_dump({"config": {}, "metric": "val_accuracy", "value": 0.9,
                                                        "trials": 1}))
    (tmp_path / "history.csv").write_text("epoch,train_loss,val_loss,val_accuracy,val_balanced_accuracy,frozen\n"
                                          "0,0.7,0.6,0.6,0.6,1\n1,0.4,0.4,0.8,0.8,0\n")
    (tmp_path / "run.json").write_text(json.dumps({"best_epoch": 1}))
    summary = run["tmp"] / "out" / "summary.json"
    inputs = ReportInputs(ingest_quarantine=tmp_path / "none.csv", anonymize_quarantine=tmp_path / "none.csv",
                          audit=tmp_path / "audit.json", stats=tmp_path / "stats.json", best=tmp_path / "best.yaml",
                          trials=tmp_path / "none.csv", search=tmp_path / "none.png", history=tmp_path / "history.csv",
                          run=tmp_path / "run.json", metrics=evaluated["tmp"] / "tta" / "metrics.json",
                          predict={"new": summary})
    outputs = Outputs(html=tmp_path / "r" / "index.html", card=tmp_path / "r" / "card.md",
                      card_with_model=tmp_path / "t" / "card.md", curves=tmp_path / "r" / "curves.png")
    s = {"project": "tiny", "model": {"backbone": "b", "weights": None}, "train": {"freeze_epochs": 1}, "tune": {}}
    page = project_report(inputs, outputs, s).read_text()
    card = outputs.card.read_text()
    got = run["summary"]
    for text in (page, card):
        assert "Predictions on new data" in text
        assert f"{got['files']}" in text and "haven-ct 3" in text
        for c, n in got["per_class"].items():
            assert f"{c}: {n}" in text
        for c, v in got["mean_calibrated"].items():
            assert f"{c}: {v:.3f}" in text
        t = metrics["tta"]["accuracy"]
        assert f"{t['without']:.3f}" in text and f"{t['with']:.3f}" in text and f"{t['delta']:+.3f}" in text
        assert "6 views (identity, hflip, left, right, up, down" in text
        d = metrics["decision"]
        assert (f"≥ {d['threshold']:.3f}" in text) if d["rule"] == "threshold" else "argmax" in text
    assert 'id="predictions"' in page and 'href="#predictions"' in page
    # no identifier, pseudonymous or original, reaches the page
    table = run["table"]
    for value in list(table["patient"]) + list(table["instance"]) + [str(f.stem) for f in run["files"]]:
        assert value not in page
    # a source whose summary is missing is a clear error naming it
    bad = ReportInputs(**{**inputs.__dict__, "predict": {"new": tmp_path / "missing" / "summary.json"}})
    with pytest.raises(FileNotFoundError, match="missing/summary.json is missing: run the predict stage"):
        project_report(bad, outputs, s)


def test_haven_predict_by_hand_on_an_export_with_patient_folders_passes_the_audit(run):
    """An export laid out by patient and study (the brain-ct-new demo: <patient id>/<date>_<accession>/)
    is unlabeled data: its folder names are no labels, so they are not carried past the gate (they
    were, and the audit failed on them)."""
    from haven.demonew import make_brain_ct_new

    src = run["tmp"] / "new-patients"
    make_brain_ct_new(src, n_patients=3, slices=2)
    dst = run["tmp"] / "by-hand-new"
    rc = main(["predict", str(src / "dicom"), str(dst), "--model", str(run["model_pt"]), "--evaluation",
               str(run["metrics"]), "--key-file", str(run["key_file"]), "--work", str(run["tmp"] / "phi3")])
    assert rc == 0
    table = pd.read_csv(dst / "predictions.csv", dtype=str, keep_default_na=False)
    assert len(table) == 6 and (table["status"] == "ok").all()
    assert json.loads((dst / "deid" / "audit.json").read_text())["passed"]
