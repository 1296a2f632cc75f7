"""The whole-slide reader: what it takes (and leaves to the image reader), its header, its
quarantines and its thumbnail, on small slides of the shared Aperio layout built here."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from haven.sources import Quarantine, kind_of, read_header, reader_for

LIB = "Aperio Image Library v12.0.16"
PHI = {"Date": "07/21/24", "Time": "14:03:59", "User": "j.halloran", "Filename": "Quill_R_MRN4417021_2",
       "Title": "Liver bx Quill^Rosalind MRN4417021", "ScanScope ID": "SS9931"}


def _slide(path, w=1024, h=768, *, phi=PHI):
    """A small slide of the shared layout: grey glass, a dark band of 'tissue' in the middle."""
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 240, np.uint8)
    img[h // 3: 2 * h // 3, w // 8: 7 * w // 8] = (90, 60, 120)
    img = np.clip(img.astype(np.int16) + rng.integers(-2, 3, img.shape), 0, 255).astype(np.uint8)
    jpeg = {"compression": "jpeg", "compressionargs": {"level": 80}, "photometric": "rgb", "metadata": None}
    desc = (f"{LIB} \n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=80|AppMag = 20|MPP = 0.5|"
            + "|".join(f"{k} = {v}" for k, v in phi.items()))
    levels = [np.asarray(Image.fromarray(img).resize((w // f, h // f), Image.BOX)) for f in (4, 16)]
    label = np.full((120, 160, 3), 250, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(256, 256), description=desc, software="ScanScope Console", datetime="2024:07:21 14:03:59",
                  extratags=[(315, "s", 0, "Rosalind Quill", True), (269, "s", 0, "Quill_R_MRN4417021", True),
                             (285, "s", 0, "biopsy of R. Quill", True), (316, "s", 0, "PATH-WS-0042", True)],
                  **jpeg)
        tif.write(levels[0][::2, ::2], rowsperstrip=16, description=f"{LIB} \n{w}x{h} -> {w // 8}x{h // 8} - ", **jpeg)
        for lv in levels:
            tif.write(lv, tile=(256, 256), description=f"{LIB} \n{w}x{h} -> {lv.shape[1]}x{lv.shape[0]}", **jpeg)
        tif.write(label, subfiletype=1, compression="lzw", photometric="rgb", metadata=None,
                  description=f"{LIB}\nlabel 160x120")
        tif.write(label, subfiletype=9, description=f"{LIB}\nmacro 160x120", **jpeg)
    return path


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    return _slide(tmp_path_factory.mktemp("slides") / "case 7_Quill.svs")


def test_header_fields_and_every_text_tag_as_identifier(svs):
    row, ids = read_header(svs, "biopsies/case 7_Quill.svs", check_pixels=True)
    assert row["kind"] == "slide" and row["modality"] == "SM"
    assert (row["rows"], row["cols"], row["shape"], row["spacing"]) == (768, 1024, "1024x768", "0.5x0.5")
    assert row["patient_id"] == "biopsies/case 7_Quill"
    values = {v for _, v in ids}
    assert set(PHI.values()) <= values  # the Aperio description's identifying fields
    assert {"Rosalind Quill", "Quill_R_MRN4417021", "biopsy of R. Quill", "PATH-WS-0042",
            "2024:07:21 14:03:59"} <= values  # Artist, DocumentName, PageName, HostComputer, DateTime
    assert {"case 7_Quill", "Quill"} <= values  # the file name and its parts
    # settings and the program's name are no identifiers (the audit would find them everywhere)
    assert not values & {"0.5", "20", "ScanScope Console", LIB, "case"}


def test_a_plain_tif_stays_an_image_and_a_tiled_one_is_a_slide(tmp_path, svs):
    img = np.zeros((64, 80, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "pil.tif")
    tifffile.imwrite(tmp_path / "strips.tif", img, photometric="rgb")
    tifffile.imwrite(tmp_path / "tiled.tif", np.zeros((512, 512, 3), np.uint8), tile=(256, 256),
                     photometric="rgb", compression="jpeg", metadata=None)
    (tmp_path / "pyramid.tiff").write_bytes(svs.read_bytes())
    kinds = {n: read_header(tmp_path / n, n, check_pixels=False)[0]["kind"]
             for n in ("pil.tif", "strips.tif", "tiled.tif", "pyramid.tiff")}
    assert kinds == {"pil.tif": "image", "strips.tif": "image", "tiled.tif": "slide", "pyramid.tiff": "slide"}
    assert kind_of(svs.read_bytes()[:132], ".svs") == "slide"


def test_bad_slides_are_quarantined_with_the_reason_and_the_fix(tmp_path, svs):
    raw = svs.read_bytes()
    (tmp_path / "cut.svs").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "page.svs").write_text("<html><head><title>504 Gateway Timeout</title></head></html>\n")
    (tmp_path / "scan.mrxs").write_bytes(b"\x00" * 200)
    with pytest.raises(Quarantine, match=r"truncated.*copy the slide again|unreadable.*copy the slide again"):
        read_header(tmp_path / "cut.svs", "cut.svs", check_pixels=False)
    with pytest.raises(Quarantine, match=r"not a TIFF.*HTML.*copy the slide again"):
        read_header(tmp_path / "page.svs", "page.svs", check_pixels=False)
    with pytest.raises(Quarantine, match=r"MIRAX.*convert it"):
        read_header(tmp_path / "scan.mrxs", "scan.mrxs", check_pixels=False)


def test_pixels_are_the_lowest_level_as_a_thumbnail(svs):
    reader = reader_for("slide")
    rgb = reader.pixels(svs, "rgb", [])
    gray = reader.pixels(svs, "gray", [])
    assert rgb.shape == (3, 48, 64) and gray.shape == (1, 48, 64) and rgb.dtype == np.float32
    # the tissue band is dark and purple, the glass light and grey
    assert rgb[:, 24, 32] == pytest.approx(np.array([90, 60, 120]) / 255, abs=0.06)
    assert rgb[:, 4, 4] == pytest.approx(np.full(3, 240 / 255), abs=0.03)
    assert 0.0 <= gray.min() and gray.max() <= 1.0 and gray[0, 24, 32] < gray[0, 4, 4] - 0.4


def test_a_demo_slide(tmp_path):
    from haven import demoslides

    rng = np.random.default_rng(3)
    p = demoslides._patients(4, rng, 100_000)[0]
    half, _ = demoslides.compose(2, rng)
    meta = demoslides._meta(p, 0, rng)
    demoslides.write_slide(tmp_path / "SL_1.svs", demoslides._level0(half, rng), demoslides.label_image(p, 1), p, meta)
    row, ids = read_header(tmp_path / "SL_1.svs", "SL_1.svs", check_pixels=True)
    assert (row["kind"], row["shape"], row["spacing"]) == ("slide", "4096x3072", "0.5x0.5")
    values = {v for _, v in ids}
    assert {meta["filename"], meta["user"], f"{meta['when']:%m/%d/%y}"} <= values
    assert any(p["mrn"] in v and p["family"].title() in v for v in values)  # the Title
    assert reader_for("slide").pixels(tmp_path / "SL_1.svs", "rgb", []).shape == (3, 192, 256)
