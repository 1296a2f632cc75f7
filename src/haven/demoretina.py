"""The ``retinopathy`` demo: a graded diabetic-retinopathy screening set from one real fundus photo.

The base is the colour fundus photograph that ships inside the scikit-image wheel
(``skimage.data.retina()``, nothing is downloaded).  Its optic disc sits on the viewer's left, as
in a left eye; the mirrored photo serves as the right eye.  Every patient has both eyes, one JPEG
each (512x512, quality 90).  Each image is the base under its own random crop/zoom, rotation and
shift, colour and illumination changes (gamma, white balance, vignetting, exposure), with
synthetic lesions drawn in whose number and kind set the international clinical DR grade:

* 0 none - no lesions;
* 1 mild - microaneurysms only (a few small dark-red dots);
* 2 moderate - more microaneurysms, dot/blot hemorrhages and yellow hard exudates;
* 3 severe - many hemorrhages in all four quadrants (the first leg of the 4-2-1 rule);
* 4 proliferative - a severe background plus neovascularization (a tuft of thin tortuous new
  vessels at the disc) and often a preretinal (boat-shaped) hemorrhage.

Lesion sizes are chosen for training at 128x128: a microaneurysm is ~1-1.5 px there, a hemorrhage
2-4 px, a preretinal hemorrhage 10-15 px.  A patient has a severity tendency; the two eyes' grades
are equal or differ by one.  Grades are skewed like a screening population (~45/20/18/9/8 %).

Files: ``images/IMG_<8 hex>.jpg`` (a seeded capture id: nothing of the patient in the name),
``labels.csv`` (``path,patient,grade,eye``; ``path`` relative to ``images/``, ``patient`` a
fictional hospital id ``RET<6 digits>``, for ``label_key: path`` and ``label_column: grade``) and
``lesions.csv`` (the lesion counts drawn in each image, ground truth for checks).  Planted PHI for
the gate: each JPEG's EXIF carries the patient's name (ImageDescription, Artist, UserComment),
the capture date (DateTime, DateTimeOriginal), the camera (Make, Model, serial) and the clinic's
GPS position, and a JPEG comment repeats name and id.

:func:`make_retinopathy_new` writes new, unlabeled patients the same way (another random stream,
no label or lesion table) for the predict DAG.  Both are deterministic for a seed.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from haven import demo

log = logging.getLogger(__name__)

GRADES = (0, 1, 2, 3, 4)
# patient tendencies; with the second eye one grade off (more often lower) the images come out
# near a screening population's ~45/20/18/9/8 %
GRADE_P = (0.40, 0.20, 0.21, 0.10, 0.09)
_WORK = 640  # lesions are drawn on the base at this size, then the image is warped to _OUT
_OUT = 512
_NEW_STREAM = 20_250_119  # mixed into the seed of the *-new set: never the training demo's patients
_CAMERAS = [("Topcon", "TRC-NW400", "TN4-20817"), ("Canon", "CR-2 AF", "CR2-0093114"),
            ("Zeiss", "VISUCAM 500", "VC5-77310")]
_CLINICS = [(52.3791, 4.8994), (48.1372, 11.5755), (45.4642, 9.1900)]  # lat, lon of fictional clinics
LESION_COLUMNS = ("microaneurysms", "hemorrhages", "exudates", "neovascular", "preretinal", "quadrants")


@lru_cache(maxsize=1)
def _base() -> tuple[np.ndarray, dict]:
    """The fundus photo at _WORK px (float RGB 0..1) and its landmarks (field of view, disc)."""
    from PIL import Image
    from scipy import ndimage as ndi

    try:
        from skimage import data
    except ImportError:
        raise RuntimeError("the retinopathy demo needs scikit-image (its wheel ships the fundus photo): "
                           "pip install scikit-image") from None
    rgb = np.asarray(Image.fromarray(data.retina()).resize((_WORK, _WORK), Image.LANCZOS), np.float32) / 255
    fov = rgb[..., 0] > 0.08
    ys, xs = np.nonzero(fov)
    lum = ndi.uniform_filter(rgb.mean(-1), 25)
    dy, dx = np.unravel_index(int(lum.argmax()), lum.shape)
    marks = {"cy": float(ys.mean()), "cx": float(xs.mean()), "radius": float(np.sqrt(fov.sum() / np.pi)),
             "disc": (float(dy), float(dx))}
    return rgb, marks


# ---------------------------------------------------------------------------------------------
# grades and lesions


def patient_grades(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(left, right) grades: a patient tendency from GRADE_P; the other eye equal or one lower/higher."""
    out = []
    for g in rng.choice(GRADES, size=n, p=GRADE_P):
        g = int(g)
        other = g
        if rng.random() < 0.3:
            other = int(np.clip(g + (-1 if rng.random() < 0.6 else 1), 0, 4))
        out.append((g, other) if rng.random() < 0.5 else (other, g))
    return out


def lesion_plan(grade: int, rng: np.random.Generator) -> dict:
    """How many lesions of each kind an eye of ``grade`` gets (the scale's logic, see the docstring)."""
    plan = dict.fromkeys(LESION_COLUMNS, 0)
    plan["per_quadrant"] = 0
    if grade == 1:
        plan["microaneurysms"] = int(rng.integers(3, 7))
    elif grade == 2:
        plan.update(microaneurysms=int(rng.integers(6, 14)), hemorrhages=int(rng.integers(3, 8)),
                    exudates=int(rng.integers(6, 16)))
    elif grade >= 3:
        plan.update(microaneurysms=int(rng.integers(10, 20)), per_quadrant=int(rng.integers(6, 10)),
                    exudates=int(rng.integers(8, 20)))
        if grade == 4:
            plan["neovascular"] = int(rng.integers(6, 11))
            plan["preretinal"] = int(rng.random() < 0.6)
    return plan


def _blend(img: np.ndarray, cy: float, cx: float, ry: float, rx: float, colour, opacity: float,
           theta: float = 0.0, relative: bool = True) -> None:
    """Paint a soft-edged ellipse in place: ``colour`` multiplies the background (``relative``) or
    replaces it."""
    pad = int(max(ry, rx)) + 3
    y0, y1 = max(0, int(cy) - pad), min(img.shape[0], int(cy) + pad + 1)
    x0, x1 = max(0, int(cx) - pad), min(img.shape[1], int(cx) + pad + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    c, s = np.cos(theta), np.sin(theta)
    u = ((yy - cy) * c + (xx - cx) * s) / ry
    v = (-(yy - cy) * s + (xx - cx) * c) / rx
    rho = np.sqrt(u * u + v * v)
    a = (np.clip((1.0 - rho) * min(ry, rx) / 1.5 + 0.5, 0, 1) * opacity)[..., None]
    patch = img[y0:y1, x0:x1]
    target = patch * np.asarray(colour, np.float32) if relative else np.asarray(colour, np.float32)
    img[y0:y1, x0:x1] = patch * (1 - a) + target * a


def _spot(marks: dict, rng: np.random.Generator, quadrant: int | None = None, rmax: float = 0.82):
    """A random point inside the field of view, away from the disc (in one quadrant if given)."""
    while True:
        r = marks["radius"] * rmax * np.sqrt(rng.uniform(0.02, 1.0))
        t = rng.uniform(0, 2 * np.pi) if quadrant is None else rng.uniform(0, np.pi / 2) + quadrant * np.pi / 2
        y, x = marks["cy"] + r * np.sin(t), marks["cx"] + r * np.cos(t)
        if np.hypot(y - marks["disc"][0], x - marks["disc"][1]) > 55:
            return y, x


def draw_lesions(img: np.ndarray, plan: dict, marks: dict, rng: np.random.Generator) -> dict:
    """Draw ``plan``'s lesions into ``img`` (the _WORK-px base, in place); returns the drawn counts."""
    for _ in range(plan["microaneurysms"]):  # tiny round dark-red dots
        y, x = _spot(marks, rng)
        r = rng.uniform(3.5, 5.0)
        _blend(img, y, x, r, r, (0.55, 0.18, 0.18), 0.95)
    spots = [_spot(marks, rng) for _ in range(plan["hemorrhages"])]
    spots += [_spot(marks, rng, q) for q in range(4) for _ in range(plan["per_quadrant"])]
    for y, x in spots:  # dot/blot hemorrhages: larger, irregular, dark red
        r = rng.uniform(7, 15)
        _blend(img, y, x, r, r * rng.uniform(0.6, 1.0), (0.52, 0.17, 0.15), 0.9, rng.uniform(0, np.pi))
    for _ in range(int(np.ceil(plan["exudates"] / 4))):  # hard exudates: yellow flecks in clusters
        cy, cx = _spot(marks, rng, rmax=0.6)
        for _ in range(4):
            r = rng.uniform(3.5, 7)
            _blend(img, cy + rng.normal(0, 14), cx + rng.normal(0, 14), r, r, (0.98, 0.88, 0.42), 0.9,
                   relative=False)
    for _ in range(plan["neovascular"]):
        _new_vessel(img, marks, rng)
    if plan["preretinal"]:  # a boat-shaped hemorrhage below the arcade: dark, flat-topped
        y, x = _spot(marks, rng, rmax=0.55)
        _blend(img, y, x, rng.uniform(22, 30), rng.uniform(40, 60), (0.30, 0.06, 0.06), 0.95)
    quadrants = 4 if plan["per_quadrant"] else len({_quadrant(marks, y, x) for y, x in spots})
    return {"microaneurysms": plan["microaneurysms"], "hemorrhages": len(spots), "exudates": plan["exudates"],
            "neovascular": plan["neovascular"], "preretinal": plan["preretinal"], "quadrants": quadrants}


def _quadrant(marks: dict, y: float, x: float) -> int:
    return int((np.arctan2(y - marks["cy"], x - marks["cx"]) % (2 * np.pi)) // (np.pi / 2))


def _new_vessel(img: np.ndarray, marks: dict, rng: np.random.Generator) -> None:
    """A thin tortuous new vessel: a random walk starting at the disc's rim."""
    t = rng.uniform(0, 2 * np.pi)
    y, x = marks["disc"][0] + 35 * np.sin(t), marks["disc"][1] + 35 * np.cos(t)
    heading = t
    for _ in range(int(rng.integers(40, 70))):
        heading += rng.normal(0, 0.6)
        y, x = y + 2.5 * np.sin(heading), x + 2.5 * np.cos(heading)
        _blend(img, y, x, 2.6, 2.6, (0.70, 0.25, 0.22), 0.9)


# ---------------------------------------------------------------------------------------------
# acquisition: geometry, colour, file


def acquire(eye_img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The camera: random crop/zoom, rotation and shift to _OUT px, then gamma, white balance,
    vignetting, exposure and sensor noise; returns uint8 RGB."""
    from PIL import Image

    theta = np.deg2rad(rng.uniform(-20, 20))
    zoom = rng.uniform(0.95, 1.25)  # > 1 crops into the field of view
    shift = rng.uniform(-25, 25, size=2)
    c_in, c_out = _WORK / 2, _OUT / 2
    k = _WORK / _OUT / zoom  # input px per output px
    cos, sin = np.cos(theta) * k, np.sin(theta) * k
    # PIL's affine maps output (x, y) to input: x_in = a x + b y + c
    a, b, d, e = cos, -sin, sin, cos
    c = c_in + shift[0] - a * c_out - b * c_out
    f = c_in + shift[1] - d * c_out - e * c_out
    u8 = Image.fromarray(np.clip(eye_img * 255 + 0.5, 0, 255).astype(np.uint8))
    warped = np.asarray(u8.transform((_OUT, _OUT), Image.AFFINE, (a, b, c, d, e, f), Image.BILINEAR),
                        np.float32) / 255
    yy, xx = np.mgrid[0:_OUT, 0:_OUT].astype(np.float32)
    vy, vx = rng.uniform(0.3, 0.7, size=2) * _OUT  # off-centre illumination
    rr = np.hypot(yy - vy, xx - vx) / _OUT
    vignette = (1.0 - rng.uniform(0.2, 0.6) * rr ** 2)[..., None]
    gain = rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.8, 1.15)
    out = np.clip(warped * vignette * gain, 0, 1) ** rng.uniform(0.8, 1.25)
    out = out + rng.normal(0, 0.01, size=out.shape)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def _exif(p: dict, eye: str, k: int, rng: np.random.Generator):
    """The EXIF a fundus camera's export carries, with the patient's name, date, camera and GPS."""
    from PIL import Image

    make, model, serial = _CAMERAS[p["index"] % len(_CAMERAS)]
    lat, lon = _CLINICS[p["index"] % len(_CLINICS)]
    when = f"{p['study'].strftime('%Y:%m:%d')} {(p['t0'] + 60 * k) // 3600 % 24:02d}:{p['t0'] // 60 % 60:02d}:00"
    name = f"{p['given'].title()} {p['family'].title()}"
    ex = Image.Exif()
    ex[0x010E] = f"Fundus {eye}, patient {name}, {p['patient_id']}"  # ImageDescription
    ex[0x013B] = name  # Artist (camera software often writes the patient here)
    ex[0x010F], ex[0x0110] = make, model
    ex[0x0132] = when  # DateTime
    sub = ex.get_ifd(0x8769)  # Exif IFD
    sub[0x9003] = when  # DateTimeOriginal
    sub[0x9286] = b"ASCII\x00\x00\x00" + f"{name}; born {p['birth'].isoformat()}".encode()  # UserComment
    sub[0xA431] = serial  # BodySerialNumber
    gps = ex.get_ifd(0x8825)
    lat, lon = lat + rng.uniform(-0.01, 0.01), lon + rng.uniform(-0.01, 0.01)
    gps[1], gps[2] = "N", _dms(lat)
    gps[3], gps[4] = "E", _dms(lon)
    return ex


def _dms(deg: float) -> tuple[float, float, float]:
    d = int(deg)
    m = int((deg - d) * 60)
    return (float(d), float(m), round((deg - d - m / 60) * 3600, 2))


# ---------------------------------------------------------------------------------------------
# the sets


def _patients(n: int, rng: np.random.Generator) -> list[dict]:
    """Fictional people (the brain-CT demo's names and dates) with a ``RET<6 digits>`` hospital id."""
    if n < 1:
        raise ValueError("the retinopathy demo needs n_patients >= 1")
    people = demo.fictional_patients(n, rng)
    for p, num in zip(people, rng.choice(900_000, size=n, replace=False) + 100_000):
        p["patient_id"] = f"RET{num:06d}"
    return people


def write_images(folder: Path, patients: list[dict], grades: list[tuple[int, int]],
                 rng: np.random.Generator) -> list[dict]:
    """Both eyes of every patient (``grades``: left, right) as ``folder/IMG_<8 hex>.jpg``; returns
    one record per image (path, patient, grade, eye and the lesion counts drawn)."""
    from PIL import Image

    base, marks = _base()
    mirrored = {**marks, "cx": _WORK - 1 - marks["cx"], "disc": (marks["disc"][0], _WORK - 1 - marks["disc"][1])}
    folder.mkdir()
    used: set[str] = set()
    records = []
    for p, pair in zip(patients, grades):
        for k, (eye, grade) in enumerate(zip(("L", "R"), pair)):
            img = base.copy() if eye == "L" else base[:, ::-1].copy()
            counts = draw_lesions(img, lesion_plan(grade, rng), marks if eye == "L" else mirrored, rng)
            pixels = acquire(img, rng)
            name = f"IMG_{rng.bytes(4).hex().upper()}.jpg"
            while name in used:
                name = f"IMG_{rng.bytes(4).hex().upper()}.jpg"
            used.add(name)
            comment = f"{p['family']}^{p['given']} {p['patient_id']} {eye}"
            Image.fromarray(pixels).save(folder / name, quality=90, exif=_exif(p, eye, k, rng),
                                         comment=comment.encode())
            records.append({"path": name, "patient": p["patient_id"], "grade": grade, "eye": eye, **counts})
    return records


def _write_csv(path: Path, records: list[dict], columns) -> None:
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in records]
    path.write_text("\n".join(lines) + "\n")


def _generate(out_dir: Path, n_patients: int, rng: np.random.Generator, labelled: bool) -> list[dict]:
    out_dir = Path(out_dir)
    patients = _patients(n_patients, rng)
    grades = patient_grades(n_patients, rng)
    tmp = demo.prepare_folder(out_dir)
    try:
        records = write_images(tmp / "images", patients, grades, rng)
        if labelled:
            _write_csv(tmp / "labels.csv", records, ("path", "patient", "grade", "eye"))
            _write_csv(tmp / "lesions.csv", records, ("path", "grade", *LESION_COLUMNS))
        demo.commit_folder(tmp, out_dir)
    except BaseException:
        demo.abort_folder(tmp)
        raise
    return records


def _summary(out_dir: Path, records: list[dict]) -> dict:
    per_grade = {str(g): sum(r["grade"] == g for r in records) for g in GRADES}
    return {"out_dir": str(out_dir), "patients": len({r["patient"] for r in records}),
            "images": len(records), "per_grade": per_grade, "with_exif": len(records)}


def planned_grades(n_patients: int = 150, seed: int = 0) -> list[tuple[int, int]]:
    """The (left, right) grades :func:`make_retinopathy` draws for these arguments, without writing
    anything (the grades are drawn before any pixel)."""
    rng = np.random.default_rng(seed)
    _patients(n_patients, rng)
    return patient_grades(n_patients, rng)


def make_retinopathy(out_dir: Path, n_patients: int = 150, seed: int = 0) -> dict:
    """Write the graded set under ``out_dir`` (``images/``, ``labels.csv``, ``lesions.csv``; see the
    module docstring); returns counts only."""
    records = _generate(out_dir, n_patients, np.random.default_rng(seed), labelled=True)
    log.info("retinopathy demo: %d patients, %d images under %s", n_patients, len(records), out_dir)
    return _summary(out_dir, records)


def make_retinopathy_new(out_dir: Path, n_patients: int = 20, seed: int = 0) -> dict:
    """New, unlabeled patients for prediction: ``out_dir/images/`` only, another random stream."""
    records = _generate(out_dir, n_patients, np.random.default_rng([seed, _NEW_STREAM]), labelled=False)
    log.info("retinopathy-new demo: %d unlabeled patients, %d images under %s", n_patients, len(records), out_dir)
    return _summary(out_dir, records)
