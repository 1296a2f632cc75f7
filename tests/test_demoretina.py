"""The retinopathy demo: graded fundus JPEGs with planted EXIF/GPS PHI and a path-keyed label table."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from haven import demoretina  # noqa: E402
from haven.deid.images import clean_image  # noqa: E402
from haven.ingest.labels import load_labels  # noqa: E402

N = 16  # patients: 32 images, a few seconds


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def ret(tmp_path_factory):
    out = tmp_path_factory.mktemp("ret") / "retinopathy"
    return out, demoretina.make_retinopathy(out, n_patients=N, seed=0)


def test_label_table_matches_the_files_and_loads_keyed_by_path(ret):
    out, summary = ret
    rows = _rows(out / "labels.csv")
    assert list(rows[0]) == ["path", "patient", "grade", "eye"]
    files = sorted(p.name for p in (out / "images").iterdir())
    assert sorted(r["path"] for r in rows) == files and len(files) == 2 * N == summary["images"]
    # the name carries no identifier: a seeded capture id, not the hospital id
    assert all(r["path"].startswith("IMG_") and r["patient"] not in r["path"] for r in rows)
    labels, patients, key = load_labels(out / "labels.csv", "path", "grade")
    assert key == "path" and set(labels) == set(files)
    assert patients == {r["path"]: r["patient"] for r in rows}
    assert {int(v) for v in labels.values()} <= set(range(5))


def test_both_eyes_per_patient_with_correlated_grades(ret):
    out, _ = ret
    by_patient = defaultdict(dict)
    for r in _rows(out / "labels.csv"):
        assert r["patient"].startswith("RET") and len(r["patient"]) == 9
        by_patient[r["patient"]][r["eye"]] = int(r["grade"])
    assert len(by_patient) == N
    assert all(set(eyes) == {"L", "R"} and abs(eyes["L"] - eyes["R"]) <= 1 for eyes in by_patient.values())


def test_planned_grades_match_the_files_and_cover_every_grade_at_the_default_size(ret):
    out, _ = ret
    rows = _rows(out / "labels.csv")
    planned = demoretina.planned_grades(N, seed=0)
    assert [int(r["grade"]) for r in rows] == [g for pair in planned for g in pair]
    counts = Counter(g for pair in demoretina.planned_grades() for g in pair)  # the default: 150 patients
    assert set(counts) == set(range(5))
    shares = np.array([counts[g] for g in range(5)]) / sum(counts.values())
    assert shares[0] > 0.35 and shares[0] > shares[1] > shares[3] and min(shares) >= 0.04  # screening skew


def test_lesion_counts_follow_the_grading_scale(ret):
    out, _ = ret
    rows = _rows(out / "lesions.csv")
    assert {r["path"] for r in rows} == {r["path"] for r in _rows(out / "labels.csv")}
    for r in rows:
        g, ma, he, ex = int(r["grade"]), int(r["microaneurysms"]), int(r["hemorrhages"]), int(r["exudates"])
        nv, pre = int(r["neovascular"]), int(r["preretinal"])
        if g == 0:
            assert ma == he == ex == nv == pre == 0
        elif g == 1:
            assert ma >= 1 and he == ex == nv == pre == 0  # microaneurysms only
        elif g == 2:
            assert ma > 0 and he > 0 and ex > 0 and nv == pre == 0
        else:
            assert he >= 20 and int(r["quadrants"]) == 4  # hemorrhages in all four quadrants
            assert (nv > 0 or pre > 0) == (g == 4)
    # more lesions with every grade (grade 4 adds its new vessels to a severe background)
    total = defaultdict(list)
    for r in rows:
        total[int(r["grade"])].append(sum(int(r[c]) for c in demoretina.LESION_COLUMNS if c != "quadrants"))
    means = [np.mean(total[g]) for g in sorted(total)]
    assert means == sorted(means) and len(set(means)) == len(means)


def test_lesions_darken_the_image():
    """A grade-3 eye is darker (hemorrhages) than the same eye with no lesions, in the same frame."""
    base, marks = demoretina._base()
    clean, sick = base.copy(), base.copy()
    demoretina.draw_lesions(sick, demoretina.lesion_plan(3, np.random.default_rng(1)), marks,
                            np.random.default_rng(2))
    small = [np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((128, 128)), np.float32)
             for a in (clean, sick)]
    darker = (small[0] - small[1])[..., 0]  # red channel: blood absorbs
    assert (darker > 40).sum() >= 20  # dozens of 128-px pixels visibly changed


def test_deterministic_per_seed(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(_make(tmp_path / "a", 3))
    b = files(_make(tmp_path / "b", 3))
    c = files(_make(tmp_path / "c", 4))
    assert a == b and a != c


def _make(out, seed):
    demoretina.make_retinopathy(out, n_patients=2, seed=seed)
    return out


def test_new_patients_are_unlabeled_and_not_the_training_set(tmp_path, ret):
    out, _ = ret
    summary = demoretina.make_retinopathy_new(tmp_path / "new", n_patients=3, seed=0)
    assert sorted(p.name for p in (tmp_path / "new").iterdir() if not p.name.startswith(".")) == ["images"]
    new = {p.read_bytes() for p in (tmp_path / "new" / "images").iterdir()}
    assert len(new) == 6 == summary["images"]
    assert not new & {p.read_bytes() for p in (out / "images").iterdir()}


def test_planted_exif_gps_and_name_are_removed_by_image_anonymization(ret, tmp_path):
    out, _ = ret
    src = sorted((out / "images").iterdir())[0]
    with Image.open(src) as im:
        exif = im.getexif()
        gps, sub = exif.get_ifd(0x8825), exif.get_ifd(0x8769)
        name = exif[0x013B]  # Artist: the patient's name
        assert gps.get(2) and gps.get(4)  # latitude, longitude
        assert sub.get(0x9003) and exif.get(0x010F) and exif.get(0x0110)  # DateTimeOriginal, Make, Model
        assert name.split()[-1].upper().encode() in im.info["comment"]
        before = np.asarray(im)
    raw = src.read_bytes()
    assert name.encode() in raw
    data, suffix, removed = clean_image(src)
    assert suffix == ".jpg" and removed >= 2  # the EXIF segment and the comment
    cleaned = tmp_path / "clean.jpg"
    cleaned.write_bytes(data)
    with Image.open(cleaned) as im:
        assert len(im.getexif()) == 0 and "comment" not in im.info and "exif" not in im.info
        assert np.array_equal(np.asarray(im), before)  # pixels untouched
    for needle in (name.encode(), name.split()[-1].encode(), b"Exif", b"GPS", b"Canon", b"Topcon", b"Zeiss"):
        assert needle not in data
