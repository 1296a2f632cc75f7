"""Whole-slide de-identification (haven.deid.slides) on small slides of the shared Aperio layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
tiffslide = pytest.importorskip("tiffslide")
pytest.importorskip("imagecodecs")

from haven import keys  # noqa: E402
from haven.deid.errors import AnonymizeError  # noqa: E402
from haven.deid.slides import MARK_ITEM, check_slide, deidentify_slide, output_name, slide_texts  # noqa: E402

W, H = 768, 512
LIB = "Aperio Image Library v12.0.16"
PHI = {"Date": "03/14/25", "Time": "10:11:12", "User": "jdoe.pathologist", "Filename": "SMITH_JOHN_4471",
       "Title": "MRN998877", "ScanScope ID": "SS7741"}
TAG_PHI = {306: "2025:03:14 10:11:12", 315: "Artist Quinn", 316: "HOSTPATHLAB7", 269: "DOC_SMITH_JOHN"}
KEY = b"k" * 32


def _image(rng, h, w):
    """Smooth colour gradients plus noise: JPEG-able, not constant."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
    return np.clip(img + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _split_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """(JPEGTables, abbreviated stream) of a JPEG: its DQT and DHT segments moved to the tables, as
    Aperio's scanners store tiles."""
    tables, rest, i = b"\xff\xd8", b"\xff\xd8", 2
    while jpeg[i:i + 2] != b"\xff\xda":
        segment = jpeg[i:i + 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")]
        if segment[:2] in (b"\xff\xdb", b"\xff\xc4"):
            tables += segment
        else:
            rest += segment
        i += len(segment)
    return tables + b"\xff\xd9", rest + jpeg[i:]


def _tiled(tw, img: np.ndarray, mode: str, **kw) -> None:
    """Write a tiled JPEG level: tifffile's encoder, or (``tables``) tiles with shared JPEGTables."""
    if mode != "tables":
        tw.write(img, tile=(256, 256), **kw)
        return
    import imagecodecs

    h, w = img.shape[:2]
    padded = np.zeros((-(-h // 256) * 256, -(-w // 256) * 256, 3), np.uint8)
    padded[:h, :w] = img
    split = [_split_tables(imagecodecs.jpeg8_encode(padded[y:y + 256, x:x + 256], level=80, colorspace="RGB",
                                                    outcolorspace="RGB", subsampling="444"))
             for y in range(0, padded.shape[0], 256) for x in range(0, padded.shape[1], 256)]
    assert len({t for t, _ in split}) == 1  # one set of tables for every tile
    kw = {**kw, "compressionargs": {"outcolorspace": "RGB"}, "subsampling": (1, 1)}
    tw.write(iter([s for _, s in split]), shape=img.shape, dtype=img.dtype, tile=(256, 256),
             jpegtables=split[0][0], **kw)


def make_slide(path: Path, mode: str = "ycbcr") -> Path:
    """A slide of the shared layout: level 0, strip thumbnail, levels /4 and /16, label, macro.
    ``mode``: JPEG tiles as tifffile writes them (YCbCr 2x2), ``rgb`` (RGB, as many Aperio scanners
    store them) or ``tables`` (RGB, abbreviated tiles and a JPEGTables tag, as Aperio's own)."""
    rng = np.random.default_rng(7)
    img = _image(rng, H, W)
    keys_ = "|".join(f"{k} = {v}" for k, v in PHI.items())
    d0 = f"{LIB} \n{W}x{H} [0,0 {W}x{H}] (256x256) JPEG/RGB Q=80|AppMag = 20|MPP = 0.5|{keys_}"
    cargs = {"level": 80, **({"outcolorspace": "RGB"} if mode == "rgb" else {})}
    kw = dict(photometric="rgb", compression="jpeg", compressionargs=cargs, metadata=None, software=False)
    if mode == "rgb":
        kw["subsampling"] = (1, 1)
    texts = [(code, 2, 0, value, True) for code, value in TAG_PHI.items() if code != 306]
    label = rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        _tiled(tw, img, mode, description=d0, datetime=TAG_PHI[306], extratags=texts, **kw)
        tw.write(img[::8, ::8], description=f"{LIB} \n{W}x{H} -> {W // 8}x{H // 8} - ", **kw)
        for f in (4, 16):
            _tiled(tw, np.ascontiguousarray(img[::f, ::f]), mode,
                   description=f"{LIB} \n{W}x{H} (256x256) -> {W // f}x{H // f} JPEG/RGB Q=80", **kw)
        tw.write(label, subfiletype=1, photometric="rgb", compression="lzw", metadata=None, software=False,
                 description=f"{LIB}\nlabel 200x100")
        tw.write(label[:, :150], subfiletype=9, photometric="rgb", compression="jpeg", metadata=None,
                 software=False, description=f"{LIB}\nmacro 150x100")
    return path


@pytest.fixture(scope="module", params=["ycbcr", "rgb", "tables"])
def slides(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"slides-{request.param}")
    src = make_slide(tmp / "SMITH_JOHN_4471.svs", request.param)
    dst = tmp / "out" / "a.svs"
    done = deidentify_slide(src, dst)
    return src, dst, done


def test_output_reads_as_aperio_without_label_or_macro(slides):
    src, dst, done = slides
    assert done == {"level": 3, "thumbnail": 1, "label": 1, "macro": 1, "other": 0,
                    "keys_dropped": len(PHI), "bytes_copied": done["bytes_copied"]}
    a, b = tiffslide.TiffSlide(src), tiffslide.TiffSlide(dst)
    assert sorted(a.associated_images) == ["label", "macro", "thumbnail"]
    assert list(b.associated_images) == ["thumbnail"]
    assert b.properties["tiffslide.vendor"] == "aperio"
    assert b.properties["tiffslide.mpp-x"] == a.properties["tiffslide.mpp-x"] == 0.5
    assert b.properties["tiffslide.objective-power"] == 20
    assert b.level_dimensions == a.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
    with tifffile.TiffFile(dst) as tif:
        assert [p.subfiletype for p in tif.pages] == [0, 0, 0, 0]
        assert not any(w in p.description for p in tif.pages for w in ("label", "macro"))


def test_openslide_reads_the_output(slides):
    openslide = pytest.importorskip("openslide")
    _, dst, _ = slides
    o = openslide.OpenSlide(str(dst))
    assert o.properties["openslide.vendor"] == "aperio"
    assert float(o.properties["openslide.mpp-x"]) == 0.5
    assert set(o.associated_images) == {"thumbnail"}
    assert o.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))


def test_tiles_are_copied_not_reencoded(slides):
    src, dst, _ = slides
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(dst) as b:
        for pa, pb in zip([a.pages[i] for i in (0, 2, 3)], [b.pages[i] for i in (0, 2, 3)]):
            raw = []
            for tif, page in ((a, pa), (b, pb)):
                fh = tif.filehandle
                raw.append([(fh.seek(o), fh.read(n))[1] for o, n in zip(page.dataoffsets, page.databytecounts)])
            assert raw[0] == raw[1]
            assert (pa.photometric, pa.subsampling, pa.jpegtables) == (pb.photometric, pb.subsampling, pb.jpegtables)
        assert (a.pages[0].jpegtables is not None) == ("tables" in str(src.parent.name))
    region = ((300, 100), 0, (400, 300))
    before = np.asarray(tiffslide.TiffSlide(src).read_region(*region))
    after = np.asarray(tiffslide.TiffSlide(dst).read_region(*region))
    assert before.std() > 10 and np.array_equal(before, after)
    assert np.array_equal(tiffslide.TiffSlide(src).read_region((0, 0), 2, (48, 32)),
                          tiffslide.TiffSlide(dst).read_region((0, 0), 2, (48, 32)))


def test_no_planted_phi_in_the_output_bytes(slides):
    src, dst, _ = slides
    planted = [*PHI.values(), *TAG_PHI.values(), "SMITH", "jdoe", "2025:03:14"]
    assert all(v.encode() in src.read_bytes() for v in planted)  # the check below can fail
    data = dst.read_bytes()
    assert [v for v in planted if v.encode() in data] == []
    texts = slide_texts(dst)
    assert [w for w, _ in texts] == [f"page {i} ImageDescription" for i in range(4)]
    assert all(MARK_ITEM in t for _, t in texts)


def test_check_slide_passes_the_output_and_finds_labels_in_the_input(slides):
    src, dst, _ = slides
    assert check_slide(dst) == []
    found = check_slide(src, "in.svs")
    kinds = {(f["where"], f["kind"]) for f in found}
    assert ("page 4", "associated label image") in kinds
    assert ("page 5", "associated macro image") in kinds
    assert ("page 0", "associated label image") not in kinds
    assert ("page 0 ImageDescription", "not marked de-identified") in kinds
    assert {"page 0 TIFF Artist tag", "page 0 TIFF DateTime tag"} <= {f["where"] for f in found}
    values = {v for f in found for v in f["values"]}
    assert f"User = {PHI['User']}" in values  # off the allow-list
    assert all(f["file"] == "in.svs" for f in found)


def test_check_slide_finds_a_label_without_its_flag_or_word(tmp_path, slides):
    """A label page of another aspect, its NewSubfileType 0 and no word of "label" in its
    description, is still not a pyramid level."""
    _, dst, _ = slides
    out = tmp_path / "x.svs"
    with tifffile.TiffFile(dst) as tif, tifffile.TiffWriter(out) as tw:
        for page in tif.pages:
            tw.write(page.asarray(), tile=(256, 256) if page.is_tiled else None, photometric="rgb",
                     compression="jpeg", description=page.description, metadata=None, software=False)
        tw.write(np.zeros((100, 200, 3), np.uint8), photometric="rgb", description=f"{LIB}\n200x100|{MARK_ITEM}",
                 metadata=None, software=False)
    assert [(f["where"], f["kind"]) for f in check_slide(out)] == [("page 4", "page not a pyramid level")]


def test_same_input_same_bytes(slides, tmp_path):
    src, dst, _ = slides
    again = tmp_path / "again.svs"
    deidentify_slide(src, again)
    assert again.read_bytes() == dst.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.svs"]  # no temporary left


def test_output_name_is_keyed():
    row = {"path": "biopsies/SMITH_JOHN_4471/scan-2025-03-14.SVS", "patient_id": "MRN998877"}
    rel = output_name(row, KEY)
    folder, name = rel.split("/")
    assert folder == keys.pseudonym(KEY, "MRN998877") and name.endswith(".svs")
    assert name == keys.image_stem(KEY, row["path"]) + ".svs"
    for part in ("SMITH", "JOHN", "4471", "2025", "scan", "MRN998877", "biopsies"):
        assert part.lower() not in rel.lower()
    assert output_name(row, b"o" * 32) != rel


@pytest.mark.parametrize("content", [b"<html><body>502 Bad Gateway</body></html>", None])
def test_a_file_that_cannot_be_rewritten_is_a_clear_error(tmp_path, content):
    src = tmp_path / "in" / "SMITH_JOHN.svs"
    src.parent.mkdir()
    if content is None:  # a truncated transfer
        whole = make_slide(tmp_path / "whole.svs").read_bytes()
        content = whole[: len(whole) // 2]
    src.write_bytes(content)
    dst = tmp_path / "out" / "a.svs"
    with pytest.raises(AnonymizeError) as err:
        deidentify_slide(src, dst)
    fix = "re-export" if content.startswith(b"<html") else "copy it again"
    assert fix in str(err.value) and "SMITH" not in str(err.value)  # the reason is quarantined
    assert err.value.path == src
    assert not dst.parent.exists() or list(dst.parent.iterdir()) == []
