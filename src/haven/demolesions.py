"""The brain-CT demo's hemorrhages: the five RSNA subtypes, each with its own shape and place.

Every hemorrhage patient has one or two subtypes (the first cycles through the five, so each is
about as common; a second is added to 40 %).  Each is drawn as a soft-edged weight map on the
patient's noise-free slice and blended towards acute-blood density (65-85 HU):

* ``epidural`` - a lens, convex towards the brain, pressed against the inner skull table
  (long axis 70-100 px along the bone, 22-32 px deep: biconvex-looking, short and thick);
* ``subdural`` - a crescent hugging the inner table over 160-240 px, at most 14-22 px thick;
* ``intraparenchymal`` - a round/oval blob (radius 18-35 px) deep in the parenchyma;
* ``intraventricular`` - blood filling the ventricle on the midline (the fourth ventricle of the
  base slice, radius 11-16 px);
* ``subarachnoid`` - bright bands (5 px) along the brain's surface, sulci and cisterns, in three
  or four patches.

At the training size (64 px, 8x smaller) these stay apart: a thin long rim (subdural), a short
thick rim (epidural), a central spot (intraventricular), a deep blob (intraparenchymal) and faint
lines (subarachnoid, the hardest, as in real scans).  The windows 40/80 and 80/200 show the blood;
the bone window shows where the skull is.

:func:`lesion_mask` gives the pixels that are blood (more blood than tissue after the blend of
:func:`blood_delta`), and :func:`segmentation` turns the stored slices' masks into one DICOM-SEG
(highdicom, BINARY) per series: a single segment ``lesion`` (segment number 1, property type
SNOMED "Hemorrhage") whatever the subtypes, so that a segmentation project's classes are
``[background, lesion]`` (class index = segment number).
"""

from __future__ import annotations

import numpy as np

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
VENTRICLE_RC = (330.0, 257.0)  # (row, col) of the base slice's fourth ventricle (and the phantom's)
_BONE_HU = 250.0


def assign_subtypes(patients: list[dict], rng: np.random.Generator) -> None:
    """Set ``p["subtypes"]`` (a sorted tuple; empty for a normal patient) on every patient."""
    order = rng.permutation(len(SUBTYPES))
    k = 0
    for p in patients:
        if not p["label"]:
            p["subtypes"] = ()
            continue
        first = SUBTYPES[order[k % len(SUBTYPES)]]
        k += 1
        chosen = {first}
        if rng.random() < 0.4:
            chosen.add(str(rng.choice([s for s in SUBTYPES if s != first])))
        p["subtypes"] = tuple(sorted(chosen))


def anatomy(anat: np.ndarray) -> dict:
    """The maps the shapes are placed with: brain mask and the distances to its edge and to bone."""
    from scipy import ndimage as ndi

    smooth = ndi.uniform_filter(anat, 5)
    brain = ndi.binary_opening((smooth > 18) & (smooth < 55), iterations=3)
    lab, n = ndi.label(brain)
    if n:
        sizes = ndi.sum(brain, lab, np.arange(1, n + 1))
        brain = np.isin(lab, np.flatnonzero(sizes >= 1500) + 1)
    bone = anat > _BONE_HU
    inside = ndi.binary_dilation(brain, iterations=14) & ~bone & (anat > -100)
    return {"brain": brain, "brain_dist": ndi.distance_transform_edt(brain),
            "bone_dist": ndi.distance_transform_edt(~bone), "inside": inside}


def _pick(mask: np.ndarray, rng: np.random.Generator, fallback: np.ndarray) -> np.ndarray:
    pts = np.argwhere(mask)
    if len(pts) == 0:
        pts = np.argwhere(fallback)
    return pts[int(rng.integers(len(pts)))].astype(float)


def _ellipse(shape, cy: float, cx: float, a: float, b: float, theta: float, edge: float = 2.0) -> np.ndarray:
    """A soft ellipse (weight 1 inside, ``edge``-px ramp); ``a`` along (cos theta, sin theta) in (row, col)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    c, s = np.cos(theta), np.sin(theta)
    u = ((yy - cy) * c + (xx - cx) * s) / a
    v = (-(yy - cy) * s + (xx - cx) * c) / b
    rho = np.sqrt(u * u + v * v)
    return np.clip((1.0 - rho) * min(a, b) / edge, 0.0, 1.0)


def _rim_anchor(m: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A point of the brain next to the inner table and the unit normal pointing into the brain."""
    near = m["brain"] & (m["bone_dist"] < 12)
    p = _pick(near, rng, m["brain"])
    gy, gx = np.gradient(m["bone_dist"])
    n = np.array([gy[int(p[0]), int(p[1])], gx[int(p[0]), int(p[1])]])
    n = n / (np.linalg.norm(n) + 1e-6)
    return p, n


def epidural(m: dict, shape, rng: np.random.Generator) -> np.ndarray:
    p, n = _rim_anchor(m, rng)
    table = p - n * m["bone_dist"][int(p[0]), int(p[1])]  # on the inner table
    tangent = np.arctan2(-n[0], n[1])  # (row, col) direction perpendicular to n
    w = _ellipse(shape, table[0], table[1], rng.uniform(35, 50), rng.uniform(22, 32), tangent)
    return w * m["inside"]


def subdural(m: dict, shape, rng: np.random.Generator) -> np.ndarray:
    p, _ = _rim_anchor(m, rng)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    reach = rng.uniform(80, 120)
    taper = np.clip(1.0 - ((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / reach ** 2, 0.0, 1.0)
    thick = rng.uniform(14, 22) * np.sqrt(taper)
    w = np.clip(thick - m["bone_dist"] + 1.0, 0.0, 1.0) * (taper > 0)
    return w * m["inside"]


def intraparenchymal(m: dict, shape, rng: np.random.Generator, centre=VENTRICLE_RC) -> np.ndarray:
    r = min(float(rng.uniform(18, 35)), max(12.0, float(m["brain_dist"].max()) / 0.8))
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    far = np.hypot(yy - centre[0], xx - centre[1]) > r + 25  # not the ventricle's place
    p = _pick((m["brain_dist"] >= 0.8 * r) & far, rng, m["brain_dist"] >= m["brain_dist"].max())
    return _ellipse(shape, p[0], p[1], r, r * rng.uniform(0.75, 1.0), rng.uniform(0, np.pi))


def intraventricular(m: dict, shape, rng: np.random.Generator, centre=VENTRICLE_RC) -> np.ndarray:
    r = rng.uniform(11, 16)
    cy, cx = centre[0] + rng.uniform(-3, 3), centre[1] + rng.uniform(-3, 3)
    return _ellipse(shape, cy, cx, r, r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)) * m["inside"]


def subarachnoid(m: dict, shape, rng: np.random.Generator) -> np.ndarray:
    band = m["brain"] & (m["brain_dist"] <= 5.0)  # the brain's surface: cortex, sulci, cisterns
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    near = np.zeros(shape, bool)
    for _ in range(int(rng.integers(3, 5))):
        p = _pick(band, rng, m["brain"])
        near |= np.hypot(yy - p[0], xx - p[1]) < rng.uniform(50, 80)
    return (band & near).astype(np.float32)


SHAPES = {"epidural": epidural, "intraparenchymal": intraparenchymal, "intraventricular": intraventricular,
          "subarachnoid": subarachnoid, "subdural": subdural}


def patient_lesions(anat: np.ndarray, subtypes, rng: np.random.Generator, centre=VENTRICLE_RC) -> list[dict]:
    """The weight map and blood density of each of the patient's subtypes (``centre``: the
    ventricle in this patient's slice)."""
    if not subtypes:
        return []
    m = anatomy(anat)
    out = []
    for name in subtypes:
        shape_fn = SHAPES[name]
        kw = {"centre": centre} if name in ("intraparenchymal", "intraventricular") else {}
        w = shape_fn(m, anat.shape, rng, **kw).astype(np.float32)
        out.append({"subtype": name, "weight": w, "hu": float(rng.uniform(65, 85))})
    return out


def blood_delta(anat: np.ndarray, lesions: list[dict]) -> np.ndarray:
    """What the lesions add to the noise-free slice: each blends soft tissue (< 100 HU, never bone)
    towards its blood density."""
    out = anat.copy()
    soft = anat < 100
    for les in lesions:
        w = les["weight"] * soft
        out = out + w * (les["hu"] - out)
    return (out - anat).astype(np.float32)


def geometry(lesion: dict, roll: tuple[int, int]) -> str:
    """``row,col,a,b,angle,subtype,area``: the lesion's equivalent ellipse (second moments of its
    weight > 0.5) in the stored slice's pixels (after the slice's ``roll``), its subtype, its area."""
    pts = np.argwhere(lesion["weight"] > 0.5).astype(float)
    if len(pts) < 2:
        return f"nan,nan,0.0,0.0,0.0,{lesion['subtype']},{len(pts)}"
    cy, cx = pts.mean(axis=0) + np.asarray(roll, float)
    vals, vecs = np.linalg.eigh(np.cov(pts.T))
    a, b = 2 * np.sqrt(max(vals[1], 0.0)), 2 * np.sqrt(max(vals[0], 0.0))
    theta = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1])) % 180
    return f"{cy:.1f},{cx:.1f},{a:.1f},{b:.1f},{theta:.1f},{lesion['subtype']},{len(pts)}"


def lesion_mask(anat: np.ndarray, lesions: list[dict]) -> np.ndarray:
    """Where :func:`blood_delta` made the slice more blood than tissue: some lesion's weight on soft
    tissue is above 0.5 (the same cut as :func:`geometry`; the soft 2-px edge below it is less
    blood than brain, so a mask that took it would claim brain pixels)."""
    soft = anat < 100
    out = np.zeros(anat.shape, bool)
    for les in lesions:
        out |= (les["weight"] > 0.5) & soft
    return out


def segmentation(sources: list, masks: np.ndarray, uids: dict):
    """The series' lesion masks (``masks``: (slices, rows, cols) bool, one per source dataset, in
    the stored slices' pixels) as a highdicom BINARY Segmentation referencing ``sources``.

    ``uids`` gives ``series``, ``sop`` and ``dimension`` UIDs and ``date``/``time`` (DA/TM strings):
    highdicom would otherwise stamp random UIDs and the current time (content, instance creation,
    its contributing-equipment entry), and the demo must write the same bytes every run.  The patient and study modules (name, IDs, birth date, accession, study date) are copied
    from the sources by highdicom, as a real SEG export carries them: de-identification must treat
    a SEG like any DICOM.  Empty frames are omitted (highdicom's default)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=uids["series"], series_number=300, sop_instance_uid=uids["sop"],
        instance_number=1, manufacturer="HAVEN", manufacturer_model_name="haven-demo",
        software_versions="HAVEN-DEMO 1.0", device_serial_number="0", series_description="LESION MASK",
        content_label="LESION", content_date=uids["date"], content_time=uids["time"],
        series_date=uids["date"], series_time=uids["time"])
    seg.InstanceCreationDate, seg.InstanceCreationTime = uids["date"], uids["time"]
    for item in seg.ContributingEquipmentSequence:  # highdicom's own entry is stamped "now"
        if "ContributionDateTime" in item:
            item.ContributionDateTime = uids["date"] + uids["time"]
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = uids["dimension"]
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = uids["dimension"]
    return seg
