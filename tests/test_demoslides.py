"""The liver-biopsy demo: readable Aperio slides, a steatosis grade the pixels show, planted PHI
where de-identification must find it, bad files, the same bytes for the same seed."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tiffslide
import tifffile

from haven import demoslides
from haven.sources import Quarantine, read_header

RANGES = {0: (0.0, 0.05), 1: (0.05, 0.33), 2: (0.33, 0.66), 3: (0.66, 1.0)}


@pytest.fixture(scope="module")
def biopsies(tmp_path_factory):
    out = tmp_path_factory.mktemp("liver") / "liver-biopsy"
    summary = demoslides.make_liver_biopsy(out, seed=5, slides=4)  # one slide of each grade
    rows = list(csv.DictReader(open(out / "labels.csv")))
    return out, summary, rows


def test_same_seed_same_bytes(biopsies, tmp_path):
    out, _, _ = biopsies
    again = tmp_path / "again"
    demoslides.make_liver_biopsy(again, seed=5, slides=4)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_every_good_slide_opens_as_aperio(biopsies):
    out, summary, rows = biopsies
    assert summary["slides"] == 4 and summary["per_grade"] == {"0": 1, "1": 1, "2": 1, "3": 1}
    good = [r for r in rows if r["path"] in _vacuoles(out)]
    assert len(good) == 4
    for r in good:
        with tiffslide.TiffSlide(out / "images" / r["path"]) as s:
            assert s.properties["tiffslide.vendor"] == "aperio"
            assert float(s.properties["tiffslide.mpp-x"]) == 0.5 == float(s.properties["tiffslide.mpp-y"])
            assert s.level_count == 3 and s.dimensions == (4096, 3072)
            assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
            assert {"thumbnail", "label", "macro"} <= set(s.associated_images)


def _vacuoles(out):
    return {r["path"]: r for r in csv.DictReader(open(out / "vacuoles.csv"))}


def test_the_vacuole_fraction_in_the_pixels_sets_the_grade(biopsies):
    out, _, rows = biopsies
    for path, r in _vacuoles(out).items():
        with tiffslide.TiffSlide(out / "images" / path) as s:
            a = s.read_region((0, 0), 1, s.level_dimensions[1], as_array=True)[..., :3].astype(np.int16).mean(-1)
        # glass is ~240, tissue darker than 232, vacuoles brighter than 247
        droplet = a > 247
        fraction = droplet.sum() / ((a < 232) | droplet).sum()
        lo, hi = RANGES[int(r["grade"])]
        assert lo <= fraction < hi, (r["grade"], fraction, r["fraction"])
        assert abs(fraction - float(r["fraction"])) < 0.08  # what was drawn is what is seen


def test_phi_is_planted_in_the_description_label_and_table(biopsies):
    out, _, rows = biopsies
    assert list(rows[0]) == ["path", "patient", "grade", "sex", "age", "site", "name", "mrn", "birth_date"]
    good = _vacuoles(out)
    for r in (r for r in rows if r["path"] in good):
        with tifffile.TiffFile(out / "images" / r["path"]) as tf:
            desc = tf.pages[0].description
            family = r["name"].split()[-1]
            assert f"Title = Liver bx {family}" in desc and r["mrn"] in desc
            assert all(f"|{k} = " in desc for k in ("Date", "Time", "User", "Filename"))
            assert tf.pages[0].tags["Artist"].value.startswith(family)
            label = [p for p in tf.pages if "\nlabel " in p.description]
            assert len(label) == 1 and label[0].asarray().min() < 50  # text and barcode drawn in it
        assert r["path"].startswith("SL_") and family not in r["path"]  # nothing of the patient in the name


def test_bad_files_and_a_new_set_of_other_patients(biopsies, tmp_path):
    out, summary, rows = biopsies
    bad = [r for r in rows if r["path"] not in _vacuoles(out)]
    assert summary["bad_files"] == 2 and len(bad) == 2
    heads = sorted((out / "images" / r["path"]).read_bytes()[:6] for r in bad)
    assert heads[0].startswith(b"<html") and heads[1].startswith(b"II*\x00")
    for r in bad:  # what ingest will say of them
        with pytest.raises(Quarantine, match="truncated|not a TIFF"):
            read_header(out / "images" / r["path"], r["path"], check_pixels=False)
    new = demoslides.make_liver_biopsy_new(tmp_path / "new", seed=5, slides=2)
    assert new["slides"] == 2 and new["bad_files"] == 0 and not (tmp_path / "new" / "labels.csv").exists()
    table = list(csv.DictReader(open(tmp_path / "new" / "patients.csv")))
    assert "grade" not in table[0]
    assert not {r["patient"] for r in table} & {r["patient"] for r in rows}
    assert not {r["mrn"] for r in table} & {r["mrn"] for r in rows}
