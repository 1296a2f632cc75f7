"""The ``liver-biopsy`` demo: steatosis-graded liver needle biopsies as Aperio-style whole-slide images.

The tissue is the real immunohistochemistry photograph that ships inside the scikit-image wheel
(``skimage/data/ihc.png``, nothing is downloaded).  Each slide is an Aperio-SVS-style pyramidal
TIFF (the shared layout: level 0 4096x3072 px at 0.5 um/px, tiled 256x256 JPEG; a strip
thumbnail; levels at downsample 4 and 16; a label and a macro image), built like this:

* white glass (~240 RGB with a little noise) and one or two elongated needle cores whose texture
  is a mosaic of random crops, flips and rotations of ihc.png, two mosaics blended, at 1 um/px
  (ihc.png upsampled 2x at level 0) and darkened so that tissue never looks like glass;
* synthetic lipid vacuoles: round or slightly oval droplets of 8-25 um radius, brighter than the
  glass, with a thin darker rim, covering a fraction of the tissue that sets the steatosis grade
  (0: < 5 %, 1: 5-33 %, 2: 33-66 %, 3: > 66 %); the fraction is drawn inside the grade's range,
  away from the cut-offs (:data:`FRACTIONS`), and recorded in ``vacuoles.csv``.

Files: ``images/SL_<8 hex>.svs`` (a seeded scan id: nothing of the patient in the name),
``labels.csv`` (``path,patient,grade,sex,age,site,name,mrn,birth_date``; ``path`` relative to
``images/``, for ``label_key: path`` and ``label_column: grade``; one or two slides a patient,
grades balanced over slides) and ``vacuoles.csv`` (the drawn vacuole fraction, ground truth for
checks).  Planted PHI for the gate: the level-0 ImageDescription's Date, Time, User, Filename and
Title (the patient's name and MRN), DateTime/Artist/DocumentName/HostComputer tags, and the label
image (name, MRN, birth date and a barcode drawn in its pixels; the macro photo shows it too).
Two bad files in the labelled set: a truncated .svs (a transfer cut short) and an HTML error page
saved as .svs.

:func:`make_liver_biopsy_new` writes new, unlabeled patients (another random stream, disjoint
patient ids and MRNs, no grade column, no bad files) for the predict DAG.  Both are deterministic
for a seed (same seed, same bytes).
"""

from __future__ import annotations

import datetime as dt
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from haven import demo

log = logging.getLogger(__name__)

GRADES = (0, 1, 2, 3)
# vacuole fraction of the tissue drawn per grade: inside the grade's range (< 5 %, 5-33 %,
# 33-66 %, > 66 %) with a margin from each cut-off, so that JPEG and downsampling cannot move a
# slide across one
FRACTIONS = {0: (0.005, 0.025), 1: (0.11, 0.26), 2: (0.42, 0.58), 3: (0.76, 0.88)}
CUTOFFS = (0.05, 0.33, 0.66)
WIDTH, HEIGHT = 4096, 3072  # level 0, px
MPP = 0.5
_HALF = 2  # the slide is composed at 1 um/px (half the level-0 size), then upsampled
DOWNSAMPLES = (4, 16)
TILE = 256
GLASS = 240  # background grey level; vacuoles are brighter (VACUOLE), tissue darker (< TISSUE_MAX)
VACUOLE = 254
TISSUE_MAX = 226
_NEW_STREAM = 20_251_203  # mixed into the seed of the *-new set
_LIBRARY = "Aperio Image Library v12.0.16"
_USERS = ("b.okafor", "m.lindqvist", "scanner-svc", "t.nakamura")
_SCANNERS = ("SS7201", "SS1388", "SS5046")


@lru_cache(maxsize=1)
def _ihc() -> np.ndarray:
    """ihc.png as float32 RGB, rescaled into the tissue's grey range (never as bright as glass)."""
    from PIL import Image

    try:
        from skimage import data
    except ImportError:
        raise RuntimeError("the liver-biopsy demo needs scikit-image (its wheel ships ihc.png): "
                           "pip install scikit-image") from None
    path = Path(data.__file__).parent / "ihc.png"
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float32)
    return 30.0 + rgb * (TISSUE_MAX - 30.0) / 255.0


# ---------------------------------------------------------------------------------------------
# drawing (at 1 um/px)


def _mosaic(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An (h, w, 3) texture: random 256-px crops of ihc.png, flipped and rotated, side by side."""
    base = _ihc()
    out = np.empty((h, w, 3), np.float32)
    s = 256
    for y in range(0, h, s):
        for x in range(0, w, s):
            oy, ox = rng.integers(0, base.shape[0] - s, size=2)
            block = np.rot90(base[oy:oy + s, ox:ox + s], int(rng.integers(4)))
            if rng.random() < 0.5:
                block = block[:, ::-1]
            out[y:y + s, x:x + s] = block[: h - y, : w - x]
    return out


def _texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Two mosaics, the second shifted half a block, blended with a smooth weight (no seams)."""
    a = _mosaic(h, w, rng)
    b = _mosaic(h + 128, w + 128, rng)[128:, 128:]
    wgt = _weight(h, w)
    return a * wgt + b * (1 - wgt)


@lru_cache(maxsize=2)
def _weight(h: int, w: int) -> np.ndarray:
    """1 at the first mosaic's block centres, 0 on its seams (where the second's centres are)."""
    wy = np.sin(np.arange(h, dtype=np.float32) * np.pi / 256) ** 2
    wx = np.sin(np.arange(w, dtype=np.float32) * np.pi / 256) ** 2
    return (wy[:, None] * wx[None, :])[..., None]


def _cores(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean tissue mask: one or two needle cores (a long band of wavy width along a line),
    worked out at 2 um/px and repeated (the edge's 2-px steps are lost in the JPEG)."""
    h, w = h // 2, w // 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros((h, w), bool)
    n = int(rng.integers(1, 3))
    for k in range(n):
        cy = h * (k + 1) / (n + 1) + rng.uniform(-0.05, 0.05) * h
        theta = rng.uniform(-0.12, 0.12)
        half_len = w * rng.uniform(0.33, 0.43)
        half_w = rng.uniform(55, 85)  # 2 um px: a core of 0.2-0.35 mm, as an 18G needle gives
        u = (xx - w / 2) * np.cos(theta) + (yy - cy) * np.sin(theta)  # along the core
        v = -(xx - w / 2) * np.sin(theta) + (yy - cy) * np.cos(theta)  # across it
        wave = 1 + 0.12 * np.sin(u / rng.uniform(45, 80) + rng.uniform(0, 6.3))
        end = np.clip(1 - (np.abs(u) - half_len + half_w) / half_w, 0, 1)  # rounded ends
        mask |= (np.abs(u) < half_len) & (np.abs(v) < half_w * wave * np.sqrt(end))
    return np.repeat(np.repeat(mask, 2, 0), 2, 1)


def _vacuoles(tissue: np.ndarray, target: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(interior, rim) masks of droplets added at random tissue points until their interiors
    cover ``target`` of the tissue; a rim never covers another droplet's interior."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue)
    total = int(tissue.sum())
    inner = np.zeros_like(tissue)
    rim = np.zeros_like(tissue)
    covered = 0
    while covered < target * total:
        i = int(rng.integers(len(ys)))
        cy, cx = ys[i], xs[i]
        r = rng.uniform(8, 25)  # um = px here
        ry, rx = r * rng.uniform(0.85, 1.0), r * rng.uniform(0.85, 1.0)
        p = int(r) + 3
        y0, y1, x0, x1 = max(0, cy - p), min(h, cy + p + 1), max(0, cx - p), min(w, cx + p + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        rho = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        inside = (rho <= 1.0) & tissue[y0:y1, x0:x1]
        before = int(inner[y0:y1, x0:x1].sum())
        inner[y0:y1, x0:x1] |= inside
        covered += int(inner[y0:y1, x0:x1].sum()) - before
        rim[y0:y1, x0:x1] |= (rho > 1.0) & (rho <= 1.0 + 2.0 / r)
    return inner, rim & ~inner & tissue


def compose(grade: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One slide at 1 um/px as uint8 RGB (HEIGHT/2, WIDTH/2, 3), and the vacuole fraction drawn."""
    h, w = HEIGHT // _HALF, WIDTH // _HALF
    tissue = _cores(h, w, rng)
    target = rng.uniform(*FRACTIONS[grade])
    inner, rim = _vacuoles(tissue, target, rng)
    img = np.full((h, w, 3), GLASS, np.float32)
    img[tissue] = _texture(h, w, rng)[tissue] * rng.uniform(0.9, 1.0, size=3).astype(np.float32)
    img[rim] = (150.0, 110.0, 140.0)
    img[inner] = VACUOLE
    fraction = float(inner.sum() / tissue.sum())
    return np.clip(img, 0, 255).astype(np.uint8), fraction


def _level0(half: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The full-resolution level: the 1 um/px image upsampled 2x, with a little sensor noise."""
    from PIL import Image

    big = np.asarray(Image.fromarray(half).resize((WIDTH, HEIGHT), Image.BILINEAR))
    noise = rng.integers(-2, 3, size=(HEIGHT // 8, WIDTH // 8, 1), dtype=np.int16)
    noise = np.repeat(np.repeat(noise, 8, 0), 8, 1)  # blotchy, as a camera's: and cheap to JPEG
    return np.clip(big + noise, 0, 255).astype(np.uint8)


def _shrink(img: np.ndarray, factor: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w // factor, h // factor), Image.BOX))


# ---------------------------------------------------------------------------------------------
# the glass label, the macro photo and the file


def label_image(p: dict, slide_no: int) -> np.ndarray:
    """The glass label as the scanner photographs it: name, MRN, birth date and a barcode (PHI)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (420, 300), (250, 250, 244))
    d = ImageDraw.Draw(im)
    d.text((16, 14), f"{p['family'].upper()}, {p['given'].title()}", fill=(20, 20, 20))
    d.text((16, 34), f"{p['mrn']}  DOB {p['birth'].strftime('%d.%m.%Y')}", fill=(20, 20, 20))
    d.text((16, 54), f"LIVER BX  {p['study'].strftime('%d.%m.%Y')}  #{slide_no}", fill=(20, 20, 20))
    # a barcode of the MRN's digits (two bars a bit): not a real symbology, but pixels that carry it
    bits = "".join(f"{int(c):04b}" for c in p["mrn"] if c.isdigit())
    x = 16
    for b in bits:
        wide = 5 if b == "1" else 2
        d.rectangle((x, 110, x + wide - 1, 270), fill=(0, 0, 0))
        x += wide + 3
    return np.asarray(im)


def macro_image(slide: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The overview photo of the whole glass: the label at the left end, the tissue beside it."""
    from PIL import Image

    h = 431
    lab = np.asarray(Image.fromarray(label).resize((h * label.shape[1] // label.shape[0] // 2 * 2, h)))
    tissue = np.asarray(Image.fromarray(slide).resize((h * slide.shape[1] // slide.shape[0], h)))
    return np.concatenate([lab, tissue], axis=1)


def description(p: dict, meta: dict) -> str:
    """The level-0 ImageDescription an Aperio scanner writes, with the planted PHI."""
    return (f"{_LIBRARY} \n{WIDTH}x{HEIGHT} [0,0 {WIDTH}x{HEIGHT}] ({TILE}x{TILE}) JPEG/RGB Q=80"
            f"|AppMag = 20|StripeWidth = 2040|ScanScope ID = {meta['scanner']}|Filename = {meta['filename']}"
            f"|Date = {meta['when']:%m/%d/%y}|Time = {meta['when']:%H:%M:%S}|Time Zone = GMT+01:00"
            f"|User = {meta['user']}|MPP = {MPP}|Left = 25.691574|Top = 23.449873|LineCameraSkew = -0.000424"
            f"|Title = Liver bx {p['family'].title()}^{p['given'].title()} {p['mrn']}")


def write_slide(path: Path, level0: np.ndarray, label: np.ndarray, p: dict, meta: dict) -> None:
    """``level0`` as the shared Aperio layout (see the module docstring) at ``path``."""
    import tifffile

    jpeg = {"compression": "jpeg", "compressionargs": {"level": 80}, "photometric": "rgb"}
    levels = [_shrink(level0, f) for f in DOWNSAMPLES]
    thumb = _shrink(levels[0], 2)
    h, w = level0.shape[:2]
    dtime = f"{meta['when']:%Y:%m:%d %H:%M:%S}"
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(TILE, TILE), description=description(p, meta), metadata=None,
                  datetime=dtime, software="ScanScope Console",
                  extratags=[(315, "s", 0, f"{p['family'].title()}, {p['given'].title()}", True),  # Artist
                             (269, "s", 0, meta["filename"], True),  # DocumentName
                             (316, "s", 0, meta["scanner"], True)],  # HostComputer
                  **jpeg)
        tif.write(thumb, rowsperstrip=16, metadata=None,
                  description=f"{_LIBRARY} \n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - ", **jpeg)
        for lv in levels:
            tif.write(lv, tile=(TILE, TILE), metadata=None,
                      description=f"{_LIBRARY} \n{w}x{h} [0,0 {w}x{h}] -> {lv.shape[1]}x{lv.shape[0]} JPEG/RGB Q=80",
                      **jpeg)
        tif.write(label, subfiletype=1, compression="lzw", photometric="rgb", metadata=None,
                  description=f"{_LIBRARY}\nlabel {label.shape[1]}x{label.shape[0]}")
        macro = macro_image(levels[1], label)
        tif.write(macro, subfiletype=9, metadata=None,
                  description=f"{_LIBRARY}\nmacro {macro.shape[1]}x{macro.shape[0]}", **jpeg)


# ---------------------------------------------------------------------------------------------
# the sets


def _patients(n_slides: int, rng: np.random.Generator, id_base: int) -> list[dict]:
    """Fictional people with one or two slides each (``grades``: one per slide, equal within a
    patient: one liver), slide grades balanced over the set; ``LIV<6 digits>`` ids and 7-digit
    MRNs from ``id_base``'s range (disjoint between the labelled and the new set)."""
    if n_slides < 1:
        raise ValueError("the liver-biopsy demo needs slides >= 1")
    grades = [GRADES[i % len(GRADES)] for i in range(n_slides)]
    plan: list[list[int]] = []  # per patient, its slides' grades
    for g in GRADES:
        left = grades.count(g)
        while left:
            k = 2 if left >= 2 and rng.random() < 0.5 else 1
            plan.append([g] * k)
            left -= k
    order = rng.permutation(len(plan))
    plan = [plan[i] for i in order]
    people = demo.fictional_patients(len(plan), rng)
    for p in people:  # TIFF text is 7-bit ASCII: the scanner's software folds accents away
        p["family"], p["given"] = _ascii(p["family"]), _ascii(p["given"])
    ids = rng.choice(400_000, size=len(plan), replace=False) + id_base
    mrns = rng.choice(4_000_000, size=len(plan), replace=False) + id_base * 10
    for p, g, num, mrn in zip(people, plan, ids, mrns):
        p.update(patient_id=f"LIV{num:06d}", mrn=f"MRN{mrn:07d}", grades=g)
    return people


def _ascii(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _meta(p: dict, k: int, rng: np.random.Generator) -> dict:
    when = dt.datetime.combine(p["study"], dt.time()) + dt.timedelta(seconds=p["t0"] + 600 * k)
    return {"when": when, "user": _USERS[int(rng.integers(len(_USERS)))],
            "scanner": _SCANNERS[p["index"] % len(_SCANNERS)],
            "filename": f"{p['family'].title()}_{p['given'][0].upper()}_{p['mrn']}_{k + 1}"}


def write_slides(folder: Path, people: list[dict], rng: np.random.Generator) -> list[dict]:
    """Every patient's slides as ``folder/SL_<8 hex>.svs``; one record per slide."""
    folder.mkdir()
    used: set[str] = set()
    records = []
    for p in people:
        for k, grade in enumerate(p["grades"]):
            half, fraction = compose(grade, rng)
            name = f"SL_{rng.bytes(4).hex().upper()}.svs"
            while name in used:
                name = f"SL_{rng.bytes(4).hex().upper()}.svs"
            used.add(name)
            write_slide(folder / name, _level0(half, rng), label_image(p, k + 1), p, _meta(p, k, rng))
            records.append({"path": name, "patient": p["patient_id"], "grade": grade, "sex": p["sex"],
                            "age": p["age"], "site": p["site"]["issuer"],
                            "name": f"{p['given'].title()} {p['family'].title()}", "mrn": p["mrn"],
                            "birth_date": p["birth"].isoformat(), "fraction": round(fraction, 4)})
    return records


def _write_bad_files(folder: Path, people: list[dict], rng: np.random.Generator) -> list[dict]:
    """A further slide of the first two patients that cannot be read: a truncated .svs (a transfer
    cut short) and an HTML error page saved as .svs."""
    out = []
    for j, p in enumerate(people[:2]):
        name = f"SL_{rng.bytes(4).hex().upper()}.svs"
        if j == 0:
            half, fraction = compose(p["grades"][0], rng)
            k = len(p["grades"])
            write_slide(folder / name, _level0(half, rng), label_image(p, k + 1), p, _meta(p, k, rng))
            raw = (folder / name).read_bytes()
            (folder / name).write_bytes(raw[: len(raw) * 2 // 5])
        else:
            page = "<html><head><title>504 Gateway Timeout</title></head><body><h1>504 Gateway Timeout</h1>"
            (folder / name).write_text(page + "<p>slide archive proxy timed out.</p>" * 20 + "</body></html>\n")
        out.append({"path": name, "patient": p["patient_id"], "grade": p["grades"][0], "sex": p["sex"],
                    "age": p["age"], "site": p["site"]["issuer"],
                    "name": f"{p['given'].title()} {p['family'].title()}", "mrn": p["mrn"],
                    "birth_date": p["birth"].isoformat(), "fraction": ""})
    return out


LABEL_COLUMNS = ("path", "patient", "grade", "sex", "age", "site", "name", "mrn", "birth_date")


def _write_csv(path: Path, records: list[dict], columns) -> None:
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in records]
    path.write_text("\n".join(lines) + "\n")


def _generate(out_dir: Path, n_slides: int, rng: np.random.Generator, labelled: bool, id_base: int) -> dict:
    out_dir = Path(out_dir)
    people = _patients(n_slides, rng, id_base)
    tmp = demo.prepare_folder(out_dir)
    try:
        records = write_slides(tmp / "images", people, rng)
        bad = _write_bad_files(tmp / "images", people, rng) if labelled else []
        if labelled:
            _write_csv(tmp / "labels.csv", records + bad, LABEL_COLUMNS)
            _write_csv(tmp / "vacuoles.csv", records, ("path", "grade", "fraction"))
        else:
            _write_csv(tmp / "patients.csv", records, [c for c in LABEL_COLUMNS if c != "grade"])
        demo.commit_folder(tmp, out_dir)
    except BaseException:
        demo.abort_folder(tmp)
        raise
    size = sum(f.stat().st_size for f in (out_dir / "images").iterdir())
    return {"out_dir": str(out_dir), "patients": len(people), "slides": len(records),
            "per_grade": {str(g): sum(r["grade"] == g for r in records) for g in GRADES},
            "bad_files": len(bad), "megabytes": round(size / 2**20, 1)}


def make_liver_biopsy(out_dir: Path, seed: int = 0, slides: int = 48) -> dict:
    """Write the graded set under ``out_dir`` (``images/``, ``labels.csv``, ``vacuoles.csv``; see
    the module docstring); returns counts only."""
    summary = _generate(out_dir, slides, np.random.default_rng(seed), labelled=True, id_base=100_000)
    log.info("liver-biopsy demo: %d patients, %d slides under %s", summary["patients"], summary["slides"], out_dir)
    return summary


def make_liver_biopsy_new(out_dir: Path, seed: int = 0, slides: int = 12) -> dict:
    """New, unlabeled patients for prediction: ``images/`` and a ``patients.csv`` without grades
    (its name/mrn/birth_date columns are planted PHI, as in the labelled table)."""
    summary = _generate(out_dir, slides, np.random.default_rng([seed, _NEW_STREAM]), labelled=False,
                        id_base=500_000)
    log.info("liver-biopsy-new demo: %d unlabeled patients, %d slides under %s", summary["patients"],
             summary["slides"], out_dir)
    return summary
