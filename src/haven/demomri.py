"""The ``brain-mri`` demo: a BIDS dataset of synthetic T1w brain volumes from the MNI152 template.

The anatomy is the MNI152 2009a symmetric template (1 mm, 197x233x189, skull-stripped) with its
grey- and white-matter maps, which ship inside nilearn's wheel (``nilearn/datasets/data``, found
with importlib: nothing is downloaded and nilearn is not imported).  Every volume is resampled
straight from the (anti-alias smoothed) 1 mm template onto a **3 mm isotropic grid of 66x78x63**
voxels (the template's field of view), so a 48^3 crop or resize trains on CPU in minutes.  Per
volume, in this order along the sampling chain:

* a head pose (rotation up to 3 degrees, shift up to 5 mm) and a random smooth displacement field
  (a few control points per axis, 1.5-3 mm RMS);
* ``group`` (half "control", half "atrophy", balanced within site and sex so neither is a proxy):
  atrophy is a smooth local expansion about the lateral ventricles (their centroid and extent
  measured on the template: linear zoom 1.3-1.7 at the centre) and every CSF space (outside the
  brain, ventricles, dark sulci) grown by 2-4 mm into the tissue (tissue that near CSF takes the
  CSF level): larger ventricles, wider sulci, a thinner cortical ribbon;
* ``lesion`` (about 40 % of subjects): 1-3 ellipsoidal blobs of 3.5-12 mm radius centred in deep
  white matter, bright (1.35-1.6x WM) or dark (0.3-0.5x WM), deformed with the anatomy; their
  mask is written for every volume (empty for the others) under ``derivatives/lesions``;
* contrast (gamma 0.8-1.25), a smooth multiplicative bias field (about +-15 %), the site's gain
  (scanner sites shift intensity by up to 10 %) and Rician noise (2-4 % of WM).

Files (``<out>/bids``): ``dataset_description.json``, ``README``, ``participants.tsv``
(participant_id, age, sex, site, group, lesion and planted PHI: name, mrn, birth_date),
``participants.json``, a top-level ``T1w.json`` inherited by every T1w (scanner keys and the
first site's InstitutionName, which its volumes' own sidecars leave out: a de-identification
must follow the inheritance to find it), ``sub-<MRN>/sub-<MRN>_sessions.tsv`` (acquisition
times), ``sub-<MRN>/ses-<scan date>/anat/sub-<MRN>_ses-<date>_T1w.nii.gz`` with a ``.json``
sidecar, and ``derivatives/lesions/`` mirroring each image's relative path (uint8 0/1, the
image's grid and affine).  The subject label is the hospital MRN and the session label the scan
date: both PHI.  About 15 % of subjects have a second, later session (same group and lesions).

Planted PHI: sidecars (AcquisitionDateTime, AcquisitionTime, Institution*, StationName,
DeviceSerialNumber, Patient*, ReferringPhysicianName, OperatorsName) beside benign acquisition
keys; NIfTI header text (``descrip``: name and date, ``aux_file``: MRN, ``intent_name``: birth
date, ``db_name``: name); a comment extension (ecode 6, JSON with PatientName, PatientID,
AcquisitionDateTime) on every volume and a DICOM extension (ecode 2, a small DICOM header with
PatientName and PatientID) on every third.  Volumes vary in datatype (int16 scanner integers,
int16 with ``scl_slope``/``scl_inter``, or float32) and orientation (RAS, LAS, LPS; some with a
1-2 degree oblique rotation in the affine, the anatomy staying upright in world space).  Two bad
files for the quarantine, each an extra session of one of the first two subjects: a truncated
``.nii.gz`` and an HTML error page named ``.nii``.

:func:`make_brain_mri_new` writes new, unlabeled subjects the same way (another random stream,
MRNs from a disjoint range, no group/lesion columns, no derivatives, no bad files) for the
predict DAG.  Both are deterministic for a seed (nibabel writes gzip with mtime 0).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from haven import demo

log = logging.getLogger(__name__)

SPACING = 3.0  # mm
SHAPE = (66, 78, 63)  # the template's 197x233x189 mm field of view at 3 mm
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
# the lateral ventricles on the template (CSF components deeper than 12 mm): centroid between the
# two and a Gaussian reach that covers both (their std is about 9, 23, 7 mm)
_VENTRICLES = np.array([0.0, -14.0, 15.0])
_VENTRICLE_REACH = np.array([18.0, 26.0, 12.0])
_NEW_STREAM = 20_261_203  # mixed into the seed of brain-mri-new: never the training demo's subjects
# MR scanners of the three demo sites (index as demo._SITES): vendor, model, field, gain, noise
_SCANNERS = [("Siemens", "Prisma", 3.0, 1.0, 0.02, "AWP166042"),
             ("GE", "DISCOVERY MR750", 3.0, 0.9, 0.03, "MR750-31177"),
             ("Philips", "Ingenia", 1.5, 1.1, 0.04, "PHI-45112")]
_ORIENT = {"RAS": (1, 1, 1), "LAS": (-1, 1, 1), "LPS": (-1, -1, 1)}


def template_dir() -> Path:
    """nilearn's data folder with the MNI152 template (located, not imported)."""
    spec = importlib.util.find_spec("nilearn")
    folder = Path(spec.origin).parent / "datasets" / "data" if spec and spec.origin else None
    if folder is None or not (folder / _TEMPLATE.format("t1")).is_file():
        raise RuntimeError("the brain-mri demo needs nilearn's MNI152 template (shipped in its wheel): "
                           "pip install nilearn")
    return folder


@lru_cache(maxsize=1)
def _base() -> dict:
    """The template at 1 mm: T1 (smoothed for 3 mm sampling), the distance to CSF (mm), WM and CSF
    levels, lesion-centre candidates (deep WM, world mm) and the template's world-to-voxel matrix."""
    import nibabel as nib
    from scipy import ndimage as ndi

    folder = template_dir()
    t1_img = nib.load(folder / _TEMPLATE.format("t1"))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(folder / _TEMPLATE.format("wm")).dataobj, dtype=np.float32) / 255
    brain = t1 > 0
    wm_level = float(np.median(t1[wm > 0.95]))
    depth = ndi.distance_transform_edt(brain).astype(np.float32)  # mm (1 mm voxels)
    # CSF spaces: outside the brain, the ventricles and sulci (dark inside the brain mask)
    csf = ~brain | (t1 < 0.4 * wm_level)
    deep = np.argwhere((wm > 0.95) & (depth > 10))[::97]
    sigma = 0.4 * SPACING  # anti-aliasing before sampling at 3 mm
    return {"t1": ndi.gaussian_filter(t1, sigma), "wm_level": wm_level,
            "to_csf": ndi.distance_transform_edt(~csf).astype(np.float32),
            "csf_level": float(np.median(t1[csf & brain])), "affine": t1_img.affine,
            "inv": np.linalg.inv(t1_img.affine),
            "deep_wm": nib.affines.apply_affine(t1_img.affine, deep).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# subjects and sessions


def _subjects(n: int, rng: np.random.Generator, mrn_base: int) -> list[dict]:
    """Fictional people (the brain-CT demo's names, sexes, sites and group balance) with a
    7-digit MRN, sessions (scan dates), lesions and atrophy strength."""
    if n < 1:
        raise ValueError("the brain-mri demo needs subjects >= 1")
    people = demo.fictional_patients(n, rng)
    mrns = rng.choice(4_000_000, size=n, replace=False) + mrn_base
    site_names = [s["name"] for s in demo._SITES]
    for p, mrn in zip(people, mrns):
        p["mrn"] = f"MRN{mrn:07d}"
        p["site_index"] = site_names.index(p["site"]["name"])
        p["group"] = "atrophy" if p["label"] else "control"
        p["zoom"] = float(rng.uniform(0.25, 0.4)) if p["label"] else 0.0
        p["dilate"] = float(rng.uniform(2.0, 4.0)) if p["label"] else 0.0
        dates = [p["study"]]
        if rng.random() < 0.15:
            dates.append(p["study"] + dt.timedelta(days=int(rng.integers(120, 720))))
        p["dates"] = dates
    # lesions on 40 % of subjects (at least one), drawn independently of group, site and sex
    for p, has in zip(people, rng.permutation(n) < max(1, round(0.4 * n))):
        p["lesions"] = _lesions(rng) if has else []
    return people


def _lesions(rng: np.random.Generator) -> list[dict]:
    deep = _base()["deep_wm"]
    out = []
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(3.5, 12.0)
        bright = rng.random() < 0.5
        out.append({"centre": deep[int(rng.integers(len(deep)))].astype(np.float64),
                    "radii": np.maximum(r * rng.uniform(0.75, 1.25, size=3), 3.2),
                    "level": rng.uniform(1.35, 1.6) if bright else rng.uniform(0.3, 0.5)})
    return out


def _smooth_field(rng: np.random.Generator, ctrl=(4, 5, 4)) -> np.ndarray:
    """A smooth random field on the output grid (unit RMS): Gaussian bumps on a few control points."""
    mats = []
    for n, k in zip(SHAPE, ctrl):
        x, c = np.linspace(0, 1, n), np.linspace(0, 1, k)
        m = np.exp(-0.5 * ((x[:, None] - c[None, :]) * (k - 1)) ** 2)
        mats.append(m / m.sum(1, keepdims=True))
    f = np.einsum("ai,bj,ck,ijk->abc", *mats, rng.standard_normal(ctrl), optimize=True)
    return (f / f.std()).astype(np.float32)


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(np.deg2rad(degrees) * axis / np.linalg.norm(axis)).as_matrix()


def _grid_affine(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The volume's affine: RAS/LAS/LPS axes, some with a 1-2 degree oblique tilt, centred on the
    template's field of view."""
    orient = str(rng.choice(list(_ORIENT), p=[0.5, 0.25, 0.25]))
    rot = np.diag(np.array(_ORIENT[orient], float) * SPACING)
    if rng.random() < 0.4:
        rot = _rotation(rng.standard_normal(3), rng.uniform(1, 2) * rng.choice([-1, 1])) @ rot
    centre = np.array([0.0, -18.0, 22.0])  # the template's field-of-view centre (mm)
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre - rot @ ((np.array(SHAPE) - 1) / 2)
    return affine, orient


# ---------------------------------------------------------------------------------------------
# rendering


def _template_points(p: dict, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where each output voxel samples the template (world mm, 3 x N): the volume's grid, the
    head pose, the random deformation and, for atrophy, the ventricular expansion."""
    ijk = np.indices(SHAPE, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    pose = _rotation(rng.standard_normal(3), rng.uniform(-3, 3))
    centre = np.array([[0.0], [-18.0], [22.0]])
    q = pose @ (world - centre) + centre + rng.uniform(-5, 5, size=(3, 1))
    amp = rng.uniform(1.5, 3.0)
    q = q + np.stack([_smooth_field(rng).ravel() for _ in range(3)]) * amp
    if p["zoom"]:  # sample closer to the ventricles' centre: their content grows
        rel = q - _VENTRICLES[:, None]
        g = np.exp(-0.5 * np.sum((rel / _VENTRICLE_REACH[:, None]) ** 2, axis=0))
        q = q - p["zoom"] * rel * g
    return q


def render(p: dict, affine: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One volume of subject ``p`` on the grid of ``affine``: (float32 intensities, uint8 lesion mask)."""
    from scipy import ndimage as ndi

    b = _base()
    q = _template_points(p, affine, rng)
    vox = b["inv"][:3, :3] @ q + b["inv"][:3, 3:4]
    t1 = ndi.map_coordinates(b["t1"], vox, order=1, prefilter=False)
    if p["dilate"]:  # tissue within `dilate` mm of CSF becomes CSF: wider sulci, ventricles, rim
        to_csf = ndi.map_coordinates(b["to_csf"], vox, order=1, prefilter=False)
        w = np.clip((p["dilate"] - to_csf) / 2 + 0.5, 0, 1)
        t1 = t1 * (1 - w) + w * np.minimum(t1, b["csf_level"])
    mask = np.zeros(t1.shape, np.uint8)
    for les in p["lesions"]:
        rho = np.sqrt(np.sum(((q - les["centre"][:, None]) / les["radii"][:, None]) ** 2, axis=0))
        inside = rho <= 1
        if not inside.any():  # a blob squeezed between voxel centres still marks its nearest one
            inside[int(rho.argmin())] = True
        w = np.clip((1 - rho) * les["radii"].min() / SPACING + 0.5, 0, 1) * (t1 > 0.3 * b["wm_level"])
        t1 = t1 * (1 - w) + w * les["level"] * b["wm_level"]
        mask |= inside
    vendor_gain, noise = _SCANNERS[p["site_index"]][3], _SCANNERS[p["site_index"]][4]
    img = (np.clip(t1, 0, None) / b["wm_level"]) ** rng.uniform(0.8, 1.25)
    img = img.reshape(SHAPE) * np.exp(0.15 * _smooth_field(rng, (3, 3, 3))) * vendor_gain
    n1, n2 = rng.normal(0, noise, size=(2, *SHAPE))
    img = np.sqrt((img + n1) ** 2 + n2 ** 2) * 1000  # Rician magnitude, scanner-like units
    return img.astype(np.float32), mask.reshape(SHAPE)


# ---------------------------------------------------------------------------------------------
# files


def _acquired(p: dict, date: dt.date, k: int) -> dt.datetime:
    return dt.datetime.combine(date, dt.time()) + dt.timedelta(seconds=(p["t0"] + 1800 * k) % 86_400)


def _age(p: dict, date: dt.date) -> int:
    b = p["birth"]
    return date.year - b.year - ((date.month, date.day) < (b.month, b.day))


def sidecar(p: dict, date: dt.date, k: int) -> dict:
    """A dcm2niix-like sidecar: benign acquisition keys and the PHI a converter leaves behind.
    The first site's InstitutionName and scanner keys are left to the top-level T1w.json."""
    vendor, model, field, _, _, serial = _SCANNERS[p["site_index"]]
    site = p["site"]
    when = _acquired(p, date, k)
    meta = {"Modality": "MR", "SeriesDescription": "T1w_MPRAGE_3mm", "ProtocolName": "t1_mprage_sag",
            "RepetitionTime": 2.3, "EchoTime": 0.00298, "InversionTime": 0.9, "FlipAngle": 9,
            "SliceThickness": SPACING, "ConversionSoftware": "dcm2niix",
            "ConversionSoftwareVersion": "v1.0.20220720",
            "AcquisitionDateTime": when.isoformat(timespec="microseconds"),
            "AcquisitionTime": when.time().isoformat(timespec="microseconds"),
            "InstitutionAddress": site["address"], "InstitutionalDepartmentName": "NEURORADIOLOGY",
            "StationName": f"{site['issuer']}MR{p['site_index'] + 1}", "DeviceSerialNumber": serial,
            "PatientName": p["name"], "PatientID": p["mrn"], "PatientBirthDate": p["birth"].strftime("%Y%m%d"),
            "PatientSex": p["sex"], "PatientAge": f"{_age(p, date):03d}Y",
            "ReferringPhysicianName": p["referring"], "OperatorsName": p["operator"]}
    if p["site_index"]:  # override the inherited scanner and institution
        meta.update(Manufacturer=vendor, ManufacturersModelName=model, MagneticFieldStrength=field,
                    InstitutionName=site["name"])
    return meta


def top_level_sidecar() -> dict:
    vendor, model, field, _, _, _ = _SCANNERS[0]
    return {"Manufacturer": vendor, "ManufacturersModelName": model, "MagneticFieldStrength": field,
            "InstitutionName": demo._SITES[0]["name"], "MRAcquisitionType": "3D",
            "ScanningSequence": "GR\\IR", "PulseSequenceType": "MPRAGE"}


def _dicom_extension(p: dict, date: dt.date):
    """A small DICOM header as a NIfTI extension (ecode 2), as some converters embed."""
    import nibabel as nib
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = p["name"]
    ds.PatientID = p["mrn"]
    ds.PatientBirthDate = p["birth"].strftime("%Y%m%d")
    ds.StudyDate = date.strftime("%Y%m%d")
    ds.InstitutionName = p["site"]["name"]
    ds.Modality = "MR"
    return nib.nifti1.Nifti1DicomExtension(2, ds)


DTYPES = ("int16", "int16-scaled", "float32")


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray, p: dict, date: dt.date, k: int,
                 kind: str, with_dicom: bool) -> None:
    """The NIfTI file with PHI in the header text fields and extensions (see the module docstring).
    ``kind``: "int16" (scanner integers, as dcm2niix writes magnitude images), "int16-scaled"
    (fractional values: nibabel stores them with scl_slope) or "float32" (1/8-unit steps, which
    keeps the low mantissa bits compressible)."""
    import nibabel as nib

    if kind == "int16":  # an integer array: nibabel stores it unscaled (float input it would scale)
        data = np.rint(data).clip(0, np.iinfo(np.int16).max).astype(np.int16)
    elif kind == "float32":
        data = np.rint(data * 8) / 8
    img = nib.Nifti1Image(data if kind == "int16" else data.astype(np.float32), affine)
    hdr = img.header
    hdr.set_data_dtype(np.float32 if kind == "float32" else np.int16)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    given, family = p["given"].title(), p["family"].title()
    hdr["descrip"] = f"{given} {family} T1w {date.isoformat()}".encode()[:79]
    hdr["aux_file"] = p["mrn"].encode()
    hdr["intent_name"] = f"DOB{p['birth'].strftime('%Y%m%d')}".encode()
    hdr["db_name"] = f"{family[:8]}^{given[:8]}".encode()
    note = {"PatientName": p["name"], "PatientID": p["mrn"],
            "AcquisitionDateTime": _acquired(p, date, k).isoformat(timespec="seconds")}
    hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps(note).encode()))
    if with_dicom:
        hdr.extensions.append(_dicom_extension(p, date))
    nib.save(img, path)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_tsv(path: Path, rows: list[dict]) -> None:
    lines = ["\t".join(rows[0])] + ["\t".join(str(v) for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _rel(p: dict, date: dt.date, ext: str = ".nii.gz") -> Path:
    sub, ses = f"sub-{p['mrn']}", f"ses-{date.strftime('%Y%m%d')}"
    return Path(sub) / ses / "anat" / f"{sub}_{ses}_T1w{ext}"


def _write_subject(root: Path, p: dict, rng: np.random.Generator, masks: bool) -> dict:
    """Every session of ``p``: image, sidecar, (mask); returns counts."""
    counts = {"volumes": 0, "int16_scaled": 0, "float32": 0, "dicom_extension": 0, "oblique": 0}
    for k, date in enumerate(p["dates"]):
        rel = _rel(p, date)
        (root / rel.parent).mkdir(parents=True)
        affine, _ = _grid_affine(rng)
        data, mask = render(p, affine, rng)
        kind = str(rng.choice(DTYPES, p=[0.5, 0.25, 0.25]))
        with_dicom = p["index"] % 3 == 0
        write_volume(root / rel, data, affine, p, date, k, kind, with_dicom)
        _write_json(root / _rel(p, date, ".json"), sidecar(p, date, k))
        if masks:
            import nibabel as nib

            seg = nib.Nifti1Image(mask, affine)
            seg.set_sform(affine, code=1)
            seg.set_qform(affine, code=1)
            (root / "derivatives" / "lesions" / rel.parent).mkdir(parents=True)
            nib.save(seg, root / "derivatives" / "lesions" / rel)
        counts["volumes"] += 1
        counts["int16_scaled"] += kind == "int16-scaled"
        counts["float32"] += kind == "float32"
        counts["dicom_extension"] += with_dicom
        counts["oblique"] += not np.allclose(np.abs(affine[:3, :3]), np.diag([SPACING] * 3))
    return counts


def _write_bad_files(root: Path, people: list[dict], rng: np.random.Generator) -> int:
    """An extra session for each of the first two subjects whose image cannot be read: a truncated
    .nii.gz (a transfer cut short) and an HTML error page saved as .nii; both with sidecars."""
    bad = []
    for p, ext in zip(people[:2], (".nii.gz", ".nii")):
        date = p["dates"][-1] + dt.timedelta(days=30)
        p["dates"].append(date)
        rel = _rel(p, date, ext)
        (root / rel.parent).mkdir(parents=True)
        _write_json(root / _rel(p, date, ".json"), sidecar(p, date, len(p["dates"]) - 1))
        if ext == ".nii.gz":
            affine, _ = _grid_affine(rng)
            data, _ = render(p, affine, rng)
            write_volume(root / rel, data, affine, p, date, len(p["dates"]) - 1, "int16", False)
            raw = (root / rel).read_bytes()
            (root / rel).write_bytes(raw[: len(raw) * 3 // 5])
        else:
            page = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
            (root / rel).write_text(page + "<p>PACS export proxy timed out.</p>" * 20 + "</body></html>\n")
        bad.append(rel)
    return len(bad)


def _participants(people: list[dict], labelled: bool) -> list[dict]:
    rows = []
    for p in people:
        row = {"participant_id": f"sub-{p['mrn']}", "age": _age(p, p["dates"][0]), "sex": p["sex"],
               "site": p["site"]["issuer"]}
        if labelled:
            row.update(group=p["group"], lesion=int(bool(p["lesions"])))
        row.update(name=f"{p['given'].title()} {p['family'].title()}", mrn=p["mrn"],
                   birth_date=p["birth"].isoformat())
        rows.append(row)
    return sorted(rows, key=lambda r: r["participant_id"])


_COLUMNS = {
    "age": {"Description": "age at the first session", "Units": "year"},
    "sex": {"Description": "sex recorded at the scanner", "Levels": {"M": "male", "F": "female"}},
    "site": {"Description": "scanning site"},
    "group": {"Description": "diagnostic group",
              "Levels": {"control": "no atrophy", "atrophy": "enlarged ventricles and thinner cortex"}},
    "lesion": {"Description": "white-matter lesions present (masks in derivatives/lesions)",
               "Levels": {"0": "none", "1": "one to three"}},
    "name": {"Description": "patient name (PHI planted for the de-identification)"},
    "mrn": {"Description": "hospital medical record number (PHI)"},
    "birth_date": {"Description": "date of birth (PHI)"},
}


def _write_dataset_files(root: Path, people: list[dict], labelled: bool) -> None:
    name = "haven brain-mri demo" + ("" if labelled else " (new subjects)")
    _write_json(root / "dataset_description.json",
                {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw", "License": "CC0",
                 "GeneratedBy": [{"Name": "haven demo brain-mri", "Description": "synthetic, from MNI152 2009a"}]})
    (root / "README").write_text(
        f"{name}: synthetic T1w volumes generated from the MNI152 2009a template (3 mm, {SHAPE}).\n"
        "Names, MRNs, dates and institutions are fictional PHI planted to test de-identification.\n")
    rows = _participants(people, labelled)
    _write_tsv(root / "participants.tsv", rows)
    _write_json(root / "participants.json", {k: v for k, v in _COLUMNS.items() if k in rows[0]})
    _write_json(root / "T1w.json", top_level_sidecar())
    for p in people:
        sessions = [{"session_id": f"ses-{d.strftime('%Y%m%d')}",
                     "acq_time": _acquired(p, d, k).isoformat(timespec="seconds")} for k, d in enumerate(p["dates"])]
        _write_tsv(root / f"sub-{p['mrn']}" / f"sub-{p['mrn']}_sessions.tsv", sessions)
    if labelled:
        _write_json(root / "derivatives" / "lesions" / "dataset_description.json",
                    {"Name": "lesion masks", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                     "GeneratedBy": [{"Name": "haven demo brain-mri"}]})


def _generate(out_dir: Path, subjects: int, rng: np.random.Generator, labelled: bool, mrn_base: int) -> dict:
    out_dir = Path(out_dir)
    people = _subjects(subjects, rng, mrn_base)
    tmp = demo.prepare_folder(out_dir)
    try:
        root = tmp / "bids"
        root.mkdir()
        totals = dict.fromkeys(("volumes", "int16_scaled", "float32", "dicom_extension", "oblique"), 0)
        for p in people:
            for key, v in _write_subject(root, p, rng, masks=labelled).items():
                totals[key] += v
        sessions = sum(len(p["dates"]) for p in people)
        bad = _write_bad_files(root, people, rng) if labelled else 0
        _write_dataset_files(root, people, labelled)
        demo.commit_folder(tmp, out_dir)
    except BaseException:
        demo.abort_folder(tmp)
        raise
    return {"out_dir": str(out_dir), "subjects": subjects, "sessions": sessions, **totals,
            "masks": totals["volumes"] if labelled else 0,
            "atrophy": sum(p["group"] == "atrophy" for p in people),
            "lesion_subjects": sum(bool(p["lesions"]) for p in people), "bad_files": bad}


def make_brain_mri(out_dir: Path, seed: int = 0, subjects: int = 80) -> dict:
    """Write the labelled BIDS set under ``out_dir/bids`` (see the module docstring); returns counts."""
    summary = _generate(out_dir, subjects, np.random.default_rng(seed), labelled=True, mrn_base=1_000_000)
    log.info("brain-mri demo: %d subjects, %d volumes under %s", subjects, summary["volumes"], out_dir)
    return summary


def make_brain_mri_new(out_dir: Path, seed: int = 0, subjects: int = 16) -> dict:
    """New, unlabeled subjects for prediction: the same layout, no group/lesion columns or masks."""
    summary = _generate(out_dir, subjects, np.random.default_rng([seed, _NEW_STREAM]), labelled=False,
                        mrn_base=5_000_000)
    log.info("brain-mri-new demo: %d unlabeled subjects, %d volumes under %s", subjects, summary["volumes"], out_dir)
    return summary
