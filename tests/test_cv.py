"""k-fold cross-validation: patient-level folds, fold stores read as one split, the ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from haven.learn.checkpoint import load_model
from haven.learn.data import ZarrSplit
from haven.learn.ensemble import EnsembleFiles, assemble, cv_summary
from haven.learn.folds import fold_of_patients, fold_stores, make_folds
from haven.learn.models import Ensemble, build_model
from haven.learn.tasks import get_task
from test_evaluate import make_split, square_images


def _pool(n_patients=30, per_patient=3, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], per_patient)
    labels = np.repeat(rng.permutation(np.arange(n_patients) % 2), per_patient)  # a patient's images share one
    return patients, labels


def test_folds_keep_patients_whole_are_stratified_and_seeded():
    patients, labels = _pool()
    fold = fold_of_patients(patients, labels, 3, seed=7)
    assert set(fold) == {0, 1, 2}
    assert pd.DataFrame({"p": patients, "f": fold}).groupby("p")["f"].nunique().max() == 1
    for k in range(3):  # stratified: each fold holds both classes in about the pool's proportion
        share = labels[fold == k].mean()
        assert 0.3 < share < 0.7
    assert (fold_of_patients(patients, labels, 3, seed=7) == fold).all()
    assert not (fold_of_patients(patients, labels, 3, seed=8) == fold).all()


def test_too_few_patients_for_the_folds_says_what_to_change():
    patients, labels = _pool(n_patients=2)
    with pytest.raises(ValueError, match="cv.folds = 3 needs at least 3 patients.*lower cv.folds"):
        fold_of_patients(patients, labels, 3, seed=0)


def test_several_findings_are_stratified_by_their_combination():
    patients, labels = _pool(n_patients=24)
    multi = np.stack([labels, 1 - labels], 1).astype(np.float32)
    fold = fold_of_patients(patients, multi, 3, seed=0)
    assert all(0.25 < multi[fold == k, 0].mean() < 0.75 for k in range(3))


@pytest.fixture()
def train_store(tmp_path):
    patients, labels = _pool(n_patients=12, per_patient=3)
    images = square_images(labels, size=16)
    cols = {"patient": patients, "sex": ["F"] * len(labels), "age_band": [""] * len(labels),
            "site": ["S1"] * len(labels)}
    make_split(tmp_path / "train.zarr", images, labels, ["left", "right"], cols, [0.3], [0.3])
    return tmp_path / "train.zarr", images, labels, patients


def test_fold_stores_partition_the_train_split_and_read_back_as_one(tmp_path, train_store):
    store, images, labels, patients = train_store
    counts = make_folds(store, tmp_path / "folds", tmp_path / "folds.csv", 3, seed=1)
    assert sum(c["images"] for c in counts.values()) == len(labels)
    table = pd.read_csv(tmp_path / "folds.csv", dtype=str)
    assert set(table["patient"]) == set(patients) and table["patient"].is_unique
    seen = []
    for k in range(3):
        train, val = fold_stores(tmp_path / "folds", 3, k)
        assert val not in train and len(train) == 2
        split, held = ZarrSplit(train), ZarrSplit(val)
        assert len(split) + len(held) == len(labels)
        assert not set(split.column("patient")) & set(held.column("patient"))
        assert split.classes == ["left", "right"] and split.mean.tolist() == pytest.approx([0.3])
        # several stores read as one: images, labels and batches in the stores' order
        x = np.concatenate([xb.numpy() for xb, _ in split.batches(5, shuffle=False)])
        y = np.concatenate([yb.numpy() for _, yb in split.batches(5, shuffle=False)])
        assert (y == split.labels).all() and len(x) == len(split)
        assert (x[len(split) - 1] == np.asarray(split.images[len(split) - 1])).all()
        seen += held.column("patient").tolist()
        rng = np.random.default_rng(0)
        shuffled = sum(len(yb) for _, yb in split.batches(4, shuffle=True, rng=rng))
        assert shuffled == len(split)
    assert sorted(seen) == sorted(patients.tolist())  # every image validated by exactly one fold


def _member(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("test_resnet", 2, weights=None, in_chans=1).eval()


def test_ensemble_outputs_are_the_members_averaged_probabilities():
    task = get_task("classification")
    members = [_member(0), _member(1), _member(2)]
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        got = task.scores(Ensemble(members, task)(x))
    assert torch.allclose(got, expected, atol=1e-6)


def _fold_files(tmp_path: Path, k: int, metric_value: float) -> tuple[Path, Path, Path]:
    d = tmp_path / f"fold{k}"
    d.mkdir()
    torch.save({"state_dict": _member(k).state_dict(), "backbone": "test_resnet", "classes": ["left", "right"],
                "in_chans": 1, "size": 16, "mean": [0.3], "std": [0.3], "hparams": {"lr": 0.01}, "best_epoch": k,
                "task": "classification", "task_options": {}, "pixels": None}, d / "model.pt")
    (d / "run.json").write_text(json.dumps({"best_epoch": k, "best_val_balanced_accuracy": metric_value,
                                            "epochs_run": 3, "hparams": {"lr": 0.01}, "backbone": "test_resnet"}))
    pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.0, 0.8, 0.7],
                  "val_balanced_accuracy": [0.5, 0.6, metric_value]}).to_csv(d / "history.csv", index=False)
    return d / "model.pt", d / "run.json", d / "history.csv"


def test_assembled_model_loads_as_the_ensemble_and_summarises_the_folds(tmp_path):
    files = [_fold_files(tmp_path, k, v) for k, v in enumerate((0.7, 0.8, 0.9))]
    (tmp_path / "folds.csv").write_text("patient,fold,images\nP1,0,3\n")
    out = EnsembleFiles(models=[f[0] for f in files], runs=[f[1] for f in files], histories=[f[2] for f in files],
                        folds=tmp_path / "folds.csv", model=tmp_path / "train" / "model.pt",
                        history=tmp_path / "train" / "history.csv", run=tmp_path / "train" / "run.json")
    (tmp_path / "train").mkdir()
    summary = assemble(out, get_task("classification"))
    assert summary["cv"]["mean"] == pytest.approx(0.8) and summary["cv"]["sd"] == pytest.approx(0.1)
    assert [f["best_epoch"] for f in summary["cv"]["per_fold"]] == [0, 1, 2]
    history = pd.read_csv(out.history)
    assert list(history["fold"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and history.columns[0] == "fold"
    model, meta = load_model(out.model)
    assert isinstance(model, Ensemble) and len(model.members) == 3 and meta["member_best_epochs"] == [0, 1, 2]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(load_model(f[0])[0](x), 1) for f in files]).mean(0)
        assert torch.allclose(torch.softmax(model(x), 1), expected, atol=1e-6)


def test_folds_trained_differently_are_refused(tmp_path):
    files = [_fold_files(tmp_path, k, 0.5) for k in range(2)]
    meta = torch.load(files[1][0], weights_only=False)
    meta["classes"] = ["a", "b"]
    torch.save(meta, files[1][0])
    from haven.learn.ensemble import member_record

    with pytest.raises(ValueError, match="its classes differs.*re-run the train_fold jobs"):
        member_record([f[0] for f in files])


def test_cv_summary_of_one_fold_has_no_spread():
    s = cv_summary([{"best_val_qwk": 0.6, "best_epoch": 2, "epochs_run": 4}], "val_qwk")
    assert s["mean"] == 0.6 and s["sd"] == 0.0 and s["per_fold"][0]["best_val_qwk"] == 0.6


def test_grad_cam_finds_the_layers_of_an_ensemble_seen_through_a_task_view():
    """The trust sections explain a cross-validated multi-label or ordinal model through a binary
    view of the ensemble: Grad-CAM must reach a member's last stage (it took the whole ensemble
    for a layer, a map without pixels, and the evaluate stage failed)."""
    from haven.trust.explain import attribution_maps, gradcam_layer
    from haven.trust.multilabel import LabelView

    task = get_task("multilabel")
    members = [build_model("test_resnet", 3, weights=None, in_chans=1).eval() for _ in range(2)]
    view = LabelView(Ensemble(members, task), 2, 0.5).eval()
    layer = gradcam_layer(view)
    assert any(layer is m for m in members[0].modules())
    gc, ig, _ = attribution_maps(view, torch.randn(2, 1, 32, 32), np.array([1, 0]), layer, ig_steps=2)
    assert gc.shape == (2, 32, 32) and ig.shape == (2, 32, 32)
