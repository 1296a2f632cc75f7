"""Demo data generated from installed packages (nothing is downloaded).

* :func:`make_digits` - the "photos in class subfolders" case: scikit-learn's ``load_digits``
  (1797 real 8x8 scans of handwritten digits) as 8-bit PNGs in ``<class>/<index>.png``, plus
  one corrupt PNG so that the quarantine has something to show.
* :func:`make_brain_ct` - the "brain hemorrhage" case: a DICOM CT project with realistic
  (fictional) PHI in the places where real exports hide it, a label table keyed by accession
  number, and two broken files.

The anatomical base of the CT demo is a real axial head CT slice (512x512, HU, lossless
JPEG 2000) that ships with pydicom as a test file (``J2K_pixelrep_mismatch.dcm``).  The
``ctbrain1.dcm``/``ctbrain2.dcm`` files of ``deid-data`` were the first choice, but their pixel
data is an 8-bit colour (YBR JPEG) drawing of a smiley face behind a CT header, not CT
values, so they cannot serve as anatomy.  If the JPEG 2000 slice cannot be decoded (no
codec), a simple analytic head phantom is used instead and the summary says so.

Both generators are deterministic: the same seed writes the same bytes (UIDs are derived
from the seed, dates are fixed by the seed).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from haven import demolesions

log = logging.getLogger(__name__)

MARKER = ".haven-demo"  # marks a folder written by this module (safe to replace)

# ---------------------------------------------------------------------------------------------
# shared helpers


def prepare_folder(out_dir: Path) -> Path:
    """A fresh temporary folder beside ``out_dir``; refuses to replace a folder we did not write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise ValueError(
            f"{out_dir} exists, is not empty and was not written by `haven demo`: "
            "choose an empty or new folder for the demo data"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the demo is ordinary data
    (tmp / MARKER).write_text("written by haven.demo; safe to delete\n")
    return tmp


def commit_folder(tmp: Path, out_dir: Path) -> None:
    """Swap the finished temporary folder into place (no half-written demo after a kill)."""
    out_dir = Path(out_dir)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def abort_folder(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# digits


def make_digits(out_dir: Path, seed: int = 0) -> dict:
    """Write scikit-learn's digits as ``out_dir/<class>/<index>.png`` (8-bit grayscale, 8x8).

    Values 0..16 are scaled to 0..255.  One corrupt PNG (``3/corrupt.png``: a PNG signature
    followed by garbage) is planted so that ingest has something to quarantine.  ``seed`` is
    accepted for a uniform demo API; the digits themselves are fixed.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    targets = digits.target.astype(int)

    tmp = prepare_folder(out_dir)
    try:
        per_class: dict[str, int] = {}
        for i, (img, y) in enumerate(zip(images, targets)):
            cls = str(y)
            folder = tmp / cls
            if cls not in per_class:
                folder.mkdir()
                per_class[cls] = 0
            Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
            per_class[cls] += 1
        (tmp / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDRgarbage-not-a-png")
        commit_folder(tmp, out_dir)
    except BaseException:
        abort_folder(tmp)
        raise
    summary = {
        "out_dir": str(out_dir),
        "images": int(len(images)),
        "classes": len(per_class),
        "per_class": dict(sorted(per_class.items())),
        "corrupt": 1,
    }
    log.info("digits demo: %d images in %d classes (+1 corrupt) under %s", len(images), len(per_class), out_dir)
    return summary


# ---------------------------------------------------------------------------------------------
# brain CT

_FAMILY = [
    "GARCIA", "SMITH", "NGUYEN", "OKAFOR", "MÜLLER", "KOWALSKI", "TANAKA", "ROSSI", "DUBOIS",
    "JOHANSSON", "PATEL", "O'BRIEN", "NÚÑEZ", "FISCHER", "MENSAH", "IVANOVA", "CHEN", "HASSAN",
    "MURPHY", "SILVA", "KIM", "ANDERSEN", "LEFEBVRE", "MORALES", "WANJIRU", "BERGSTRÖM", "SHAPIRO",
    "HOLLOWAY", "PETROV", "YAMAMOTO", "CALLAGHAN", "VARGA", "HERNÁNDEZ", "LINDQVIST", "ABBOTT",
    "DESAI", "FONSECA", "GALLAGHER", "NAKAMURA", "OYELARAN",
]
_GIVEN = {
    "F": ["MARIA", "AISHA", "LINH", "CHIDINMA", "ANNA", "HANNA", "YUKI", "GIULIA", "CLAIRE", "INGRID",
          "PRIYA", "SIOBHAN", "LUCÍA", "SOFIE", "AMA", "OLGA", "MEI", "FATIMA", "NORA", "BEATRIZ"],
    "M": ["JOSE", "DAVID", "MINH", "EMEKA", "JÜRGEN", "PIOTR", "HIROSHI", "MARCO", "LUC", "ERIK",
          "RAJESH", "SEAN", "ANDRÉS", "KLAUS", "KWAME", "DMITRI", "WEI", "OMAR", "PATRICK", "JOÃO"],
}
_DOCTORS = [
    "HIBBARD^JULIUS^A", "OKONKWO^ADAEZE", "LARSEN^METTE^K", "FARAH^YUSUF", "BRENNAN^COLM",
    "SATO^KENJI", "MOREAU^ELODIE", "ADEYEMI^TUNDE", "WEISS^RACHEL^S", "COSTA^HELENA",
]
_OPERATORS = ["REYES^DANA", "BLOOM^TOBIAS", "ACHTERBERG^LOTTE", "QUINN^MORGAN", "NOVAK^PAVEL"]
_SITES = [
    {"name": "ST ALDRIC GENERAL HOSPITAL", "address": "12 Harbour Road, Northfield NF4 2QA",
     "station": "ALDCT01", "manufacturer": "SIEMENS", "model": "SOMATOM Definition AS+",
     "serial": "71150", "issuer": "ALDRIC", "kvp": "120"},
    {"name": "RIVERBEND UNIVERSITY MEDICAL CENTRE", "address": "400 College Avenue, Riverbend RB1 7TT",
     "station": "RBUCT2", "manufacturer": "GE MEDICAL SYSTEMS", "model": "Revolution CT",
     "serial": "RV44802", "issuer": "RBUMC", "kvp": "120"},
    {"name": "MOUNT CALDER COMMUNITY HOSPITAL", "address": "7 Quarry Lane, Calder Falls CF9 3LD",
     "station": "MCCHCT", "manufacturer": "CANON MEDICAL SYSTEMS", "model": "Aquilion ONE",
     "serial": "3AB19C0442", "issuer": "MCCH", "kvp": "135"},
]

_BASE_SPACING = 0.431  # mm, the base slice's PixelSpacing
_BRAIN_HU = 37.0  # median HU of the base slice's brain parenchyma


def base_slice() -> tuple[np.ndarray, str]:
    """The anatomical base: (HU float32 512x512, description)."""
    try:
        import pydicom
        from pydicom.data import get_testdata_file
        from pydicom.pixels import apply_modality_lut

        path = get_testdata_file("J2K_pixelrep_mismatch.dcm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        if hu.shape != (512, 512):
            raise ValueError(f"unexpected shape {hu.shape}")
        return np.clip(hu, -1024, 3071), "pydicom test file J2K_pixelrep_mismatch.dcm (real head CT)"
    except Exception as e:  # no JPEG 2000 codec, file missing: fall back to a phantom
        log.warning("real CT base slice unavailable (%s: %s); using an analytic head phantom",
                    type(e).__name__, e)
        return _phantom(), "analytic head phantom (fallback)"


def _phantom(n: int = 512) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cy, cx = n / 2, n / 2

    def ell(a, b, y0=0.0, x0=0.0):
        return ((yy - cy - y0) / a) ** 2 + ((xx - cx - x0) / b) ** 2 <= 1

    hu = np.full((n, n), -1000.0, np.float32)
    hu[ell(215, 175)] = 30.0  # scalp
    hu[ell(205, 165)] = 1200.0  # skull
    hu[ell(190, 150)] = 37.0  # brain
    hu[ell(45, 14, -10, -22) | ell(45, 14, -10, 22)] = 6.0  # lateral ventricles
    hu[ell(12, 10, 74, 1)] = 6.0  # a midline ventricle where the real slice has its fourth (demolesions)
    return hu


def _transform(base: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float]]:
    """A per-patient rigid+scale transform (shift, flip, rotation, head size) of the base; returns
    the slice and where the base's ventricle (demolesions.VENTRICLE_RC) lands in it."""
    from scipy import ndimage as ndi

    n = base.shape[0]
    c = np.array([(n - 1) / 2, (n - 1) / 2])
    theta = np.deg2rad(rng.uniform(-8, 8))
    scale = rng.uniform(0.93, 1.07)
    shift = rng.uniform(-18, 18, size=2)
    flip = rng.random() < 0.5
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    f = np.diag([1.0, -1.0 if flip else 1.0])
    m = (rot / scale) @ f
    offset = c - m @ (c + shift)
    # affine_transform reads input m @ out + offset: a base point lands at m^-1 (point - offset)
    vy, vx = np.linalg.solve(m, np.asarray(demolesions.VENTRICLE_RC) - offset)
    moved = ndi.affine_transform(base, m, offset=offset, order=1, cval=-1024.0, mode="constant")
    return moved, (float(vy), float(vx))


def _uid(seed: int, *parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["haven-demo-brain-ct", str(seed), *map(str, parts)])


def fictional_patients(n: int, rng: np.random.Generator) -> list[dict]:
    """Balanced labels; site and sex balanced within each label (so neither is a proxy)."""
    labels = np.array([1] * (n // 2) + [0] * (n - n // 2))
    rng.shuffle(labels)
    site = np.zeros(n, int)
    sex = np.empty(n, object)
    for y in (0, 1):
        idx = np.flatnonzero(labels == y)
        site[idx] = rng.permutation(np.arange(len(idx)) % len(_SITES))
        sex[idx] = rng.permutation(np.array(["F", "M"] * ((len(idx) + 1) // 2))[: len(idx)])

    family = rng.permutation(len(_FAMILY))
    ids = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    mrns = rng.choice(900_000, size=n, replace=False) + 100_000
    accs = rng.choice(900_000_000, size=n, replace=False) + 100_000_000
    used_names = set()
    out = []
    for i in range(n):
        given_pool = _GIVEN[sex[i]]
        fam = _FAMILY[family[i % len(_FAMILY)]]
        given = given_pool[int(rng.integers(len(given_pool)))]
        while (fam, given) in used_names:  # more patients than family names
            given = given_pool[int(rng.integers(len(given_pool)))]
        used_names.add((fam, given))
        middle = chr(ord("A") + int(rng.integers(26)))
        age_days = int(rng.integers(20 * 365 + 5, 90 * 365))
        study = dt.date(2021, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3 * 365)))
        birth = study - dt.timedelta(days=age_days)
        age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
        t0 = int(rng.integers(0, 24 * 3600 - 3600))
        out.append({
            "index": i,
            "label": int(labels[i]),
            "site": _SITES[site[i]],
            "sex": str(sex[i]),
            "family": fam,
            "given": given,
            "name": f"{fam}^{given}^{middle}",
            "patient_id": f"HOSP{ids[i]:07d}",
            "mrn": f"MRN{mrns[i]:06d}",
            "accession": f"{accs[i]:09d}",
            "study_id": f"{int(rng.integers(10000, 99999))}",
            "birth": birth,
            "study": study,
            "age": int(age),
            "t0": t0,
            "referring": _DOCTORS[int(rng.integers(len(_DOCTORS)))],
            "requesting": _DOCTORS[int(rng.integers(len(_DOCTORS)))],
            "performing": _DOCTORS[int(rng.integers(len(_DOCTORS)))],
            "operator": _OPERATORS[int(rng.integers(len(_OPERATORS)))],
        })
    return out


def _tm(seconds: int) -> str:
    seconds %= 24 * 3600
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def _dataset(p: dict, k: int, slices: int, uids: dict, pixels: np.ndarray):
    """One CT slice as a pydicom FileDataset-ready Dataset."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage

    site = p["site"]
    sop = uids["sop"][k]
    date = p["study"].strftime("%Y%m%d")
    t_series = p["t0"] + 95
    t_acq = t_series + 30 + 2 * k

    ds = Dataset()
    ds.file_meta = _file_meta(sop)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = _tm(t_acq + 20)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = _tm(p["t0"])
    ds.SeriesTime = _tm(t_series)
    ds.AcquisitionTime = ds.ContentTime = _tm(t_acq)
    ds.AccessionNumber = p["accession"]
    ds.Modality = "CT"
    ds.Manufacturer = site["manufacturer"]
    ds.InstitutionName = site["name"]
    ds.InstitutionAddress = site["address"]
    ds.ReferringPhysicianName = p["referring"]
    ds.StationName = site["station"]
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = "AXIAL 5MM BRAIN"
    ds.InstitutionalDepartmentName = "EMERGENCY RADIOLOGY"
    ds.PerformingPhysicianName = p["performing"]
    ds.OperatorsName = p["operator"]
    ds.ManufacturerModelName = site["model"]
    if k > 0:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = uids["sop"][0]
        ds.ReferencedImageSequence = [ref]

    # private block: values a vendor or PACS copied from the order
    block = ds.private_block(0x0009, "HAVEN_DEMO", create=True)
    block.add_new(0x10, "LO", p["patient_id"])
    block.add_new(0x11, "LO", f"{p['family']}, {p['given']}")

    _patient_and_acquisition(ds, p, site)
    _geometry_and_pixels(ds, p, k, slices, uids, pixels)
    ds.RequestAttributesSequence = [_request(p, uids)]
    ds.PixelData = pixels.tobytes()
    return ds


def _file_meta(sop: str):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HAVEN_DEMO_1"
    return meta


def _patient_and_acquisition(ds, p: dict, site: dict) -> None:
    """The patient module (with its planted identifiers) and the acquisition's device values."""
    ds.PatientName = p["name"]
    ds.PatientID = p["patient_id"]
    ds.IssuerOfPatientID = site["issuer"]
    ds.PatientBirthDate = p["birth"].strftime("%Y%m%d")
    ds.PatientSex = p["sex"]
    ds.OtherPatientIDs = p["mrn"]
    ds.PatientAge = f"{p['age']:03d}Y"

    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = "5"
    ds.KVP = site["kvp"]
    ds.DeviceSerialNumber = site["serial"]
    ds.SoftwareVersions = "HAVEN-DEMO 1.0"
    ds.ProtocolName = "ROUTINE HEAD"
    ds.PatientPosition = "HFS"


def _geometry_and_pixels(ds, p: dict, k: int, slices: int, uids: dict, pixels: np.ndarray) -> None:
    """UIDs, slice position and the image pixel module of slice ``k``."""
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = p["study_id"]
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    z = 20.0 + 5.0 * k
    half = (pixels.shape[0] / 2) * _BASE_SPACING
    ds.ImagePositionPatient = [f"{-half:.3f}", f"{-half:.3f}", f"{z:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.1f}"
    ds.ImageComments = f"Pt {p['given'].title()} {p['family'].title()}, ED referral, {k + 1}/{slices}"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{_BASE_SPACING}", f"{_BASE_SPACING}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"


def _request(p: dict, uids: dict):
    """The request attributes a RIS copies in (accession, requesting physician, study reference)."""
    from pydicom.dataset import Dataset

    req = Dataset()
    req.RequestedProcedureID = p["accession"]
    req.ScheduledProcedureStepID = f"SPS{p['accession'][-6:]}"
    req.RequestedProcedureDescription = "CT HEAD WO CONTRAST"
    req.RequestingPhysician = p["requesting"]
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    study_ref.ReferencedSOPInstanceUID = uids["study"]
    req.ReferencedStudySequence = [study_ref]
    return req


def make_brain_ct(out_dir: Path, n_patients: int = 120, slices: int = 4, seed: int = 0) -> dict:
    """Write a synthetic "brain hemorrhage" DICOM CT project under ``out_dir``.

    ``out_dir/dicom/<PatientID>/<StudyDate>_<Accession>/<InstanceNumber>.dcm``: one study with
    one axial series of ``slices`` 512x512 CT slices per patient; half the patients (balanced,
    seeded) carry one or two hemorrhage subtypes (acute-blood density, 65-85 HU, each with its
    own shape and place: :mod:`haven.demolesions`) on every slice.  ``out_dir/labels.csv``
    (the RSNA layout: ``accession,patient,label,epidural,intraparenchymal,intraventricular,
    subarachnoid,subdural,any``) holds ``hemorrhage``/``normal`` in ``label`` and 0/1 per subtype
    (``any`` = 1 iff hemorrhage); ``patient`` is the PatientID (DICOM files take their patient
    from the header; only plain images take it from this column).
    ``out_dir/dicom/truncated.dcm`` (first 300 bytes of a good file) and
    ``out_dir/dicom/notes.dcm`` (plain text) are planted for the quarantine.
    ``out_dir/lesions.csv`` records every lesion of every positive slice for checks
    (``accession,instance,row,col,semi_axis_a,semi_axis_b,angle_deg,subtype,area_px``: the
    equivalent ellipse of its mask).
    Each hemorrhage series also holds ``seg.dcm``: a BINARY DICOM-SEG (highdicom) of its blood
    pixels on every slice, one segment ``lesion`` (number 1) for all subtypes, so a segmentation
    project on this folder has classes ``[background, lesion]``; it references the series' slices
    and carries their patient and study identifiers, as a real export would.
    120 patients: 24 in a 20 % test split, enough for a ROC AUC's 95 % interval to be
    informative (60 left 12, and 0.62 on them said little).
    """
    if n_patients < 1 or slices < 1:
        raise ValueError("make_brain_ct needs n_patients >= 1 and slices >= 1")
    if n_patients > len(_FAMILY) * len(_GIVEN["F"]) // 2:
        raise ValueError(f"make_brain_ct has names for at most {len(_FAMILY) * len(_GIVEN['F']) // 2} patients")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    base, base_desc = base_slice()
    patients = fictional_patients(n_patients, rng)

    tmp = prepare_folder(out_dir)
    try:
        dicom_root = tmp / "dicom"
        n_files, first_file, lesions = write_patients(dicom_root, patients, slices, seed, rng, base, segs=True)
        (dicom_root / "truncated.dcm").write_bytes(first_file.read_bytes()[:300])
        (dicom_root / "notes.dcm").write_text(
            "Export notes from the PACS admin: series re-sent after network timeout.\n"
            "Check the slice count before research use.\n"
        )
        (tmp / "labels.csv").write_text("\n".join(label_lines(patients)) + "\n")
        (tmp / "lesions.csv").write_text("\n".join(lesions) + "\n")
        segs = sum(1 for _ in dicom_root.rglob("seg.dcm"))
        commit_folder(tmp, out_dir)
    except BaseException:
        abort_folder(tmp)
        raise

    pos = sum(p["label"] for p in patients)
    summary = {
        "out_dir": str(out_dir),
        "patients": n_patients,
        "slices": n_files,
        "hemorrhage": pos,
        "normal": n_patients - pos,
        "subtypes": {s: sum(s in p["subtypes"] for p in patients) for s in demolesions.SUBTYPES},
        "sites": {s["name"]: sum(p["site"] is s for p in patients) for s in _SITES},
        "segmentations": segs,
        "bad_files": 2,
        "labels": str(out_dir / "labels.csv"),
        "base": base_desc,
    }
    log.info("brain-ct demo: %d patients, %d slices (%d hemorrhage) under %s",
             n_patients, n_files, pos, out_dir)
    return summary


def label_lines(patients: list[dict]) -> list[str]:
    """The label table's lines (RSNA layout, header first; see make_brain_ct)."""
    lines = [",".join(["accession", "patient", "label", *demolesions.SUBTYPES, "any"])]
    for p in patients:
        flags = [str(int(s in p["subtypes"])) for s in demolesions.SUBTYPES]
        lines.append(",".join([p["accession"], p["patient_id"], "hemorrhage" if p["label"] else "normal",
                               *flags, str(int(p["label"]))]))
    return lines


def write_patients(dicom_root: Path, patients: list[dict], slices: int, uid_seed, rng: np.random.Generator,
                   base: np.ndarray, segs: bool = False) -> tuple[int, Path, list[str]]:
    """Every patient's series under ``dicom_root/<PatientID>/<StudyDate>_<Accession>/``; returns the
    CT file count, the first file and the lesion table's lines (header first).  ``uid_seed`` keys the
    UIDs (another seed, another set of studies).  Sets each patient's ``subtypes``.  ``segs``: also
    write each lesion series' masks as ``seg.dcm`` (see :func:`_write_seg`)."""
    dicom_root.mkdir()
    demolesions.assign_subtypes(patients, rng)
    first_file = None
    n_files = 0
    lesions = ["accession,instance,row,col,semi_axis_a,semi_axis_b,angle_deg,subtype,area_px"]
    for p in patients:
        i = p["index"]
        uids = {
            "study": _uid(uid_seed, i, "study"),
            "series": _uid(uid_seed, i, "series"),
            "frame": _uid(uid_seed, i, "frame"),
            "sop": [_uid(uid_seed, i, "sop", k) for k in range(slices)],
        }
        if segs:
            uids["seg"] = {kind: _uid(uid_seed, i, "seg", kind) for kind in ("series", "sop", "dimension")}
        anat, ventricle = _transform(base, rng)
        anat = anat + rng.uniform(-3, 3)
        blood = demolesions.patient_lesions(anat, p["subtypes"], rng, ventricle)
        series_dir = dicom_root / p["patient_id"] / f"{p['study'].strftime('%Y%m%d')}_{p['accession']}"
        paths = _write_series(series_dir, p, uids, anat, blood, slices, rng, lesions)
        n_files += len(paths)
        first_file = first_file or paths[0]
    return n_files, first_file, lesions


def _write_series(series_dir: Path, p: dict, uids: dict, anat: np.ndarray, blood: list[dict], slices: int,
                  rng: np.random.Generator, lesions: list[str]) -> list[Path]:
    """Write the patient's ``slices`` slices (each shifted and noised; the lesions, if any, on every
    one, their geometry appended to ``lesions``); returns their paths in order.  With ``uids["seg"]``
    a lesion series also gets its masks, rolled with each slice, as ``seg.dcm``."""
    from pydicom import dcmwrite

    series_dir.mkdir(parents=True)
    delta = demolesions.blood_delta(anat, blood) if blood else None
    mask = demolesions.lesion_mask(anat, blood) if blood and "seg" in uids else None
    mask = mask if mask is not None and mask.any() else None
    paths, written, masks = [], [], []
    for k in range(slices):
        dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
        hu = np.roll(anat if delta is None else anat + delta, (dy, dx), axis=(0, 1))
        hu = hu + rng.normal(0.0, 4.0, size=hu.shape).astype(np.float32)
        for les in blood:
            lesions.append(f"{p['accession']},{k + 1},{demolesions.geometry(les, (dy, dx))}")
        stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)
        path = series_dir / f"{k + 1}.dcm"
        ds = _dataset(p, k, slices, uids, stored)
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
        if mask is not None:
            written.append(ds)
            masks.append(np.roll(mask, (dy, dx), axis=(0, 1)))  # the same shift as the slice's pixels
    if mask is not None:
        _write_seg(series_dir / "seg.dcm", p, written, np.stack(masks), uids["seg"])
    return paths


def _write_seg(path: Path, p: dict, sources: list, masks: np.ndarray, uids: dict) -> None:
    """The series' lesion masks as one DICOM-SEG (:func:`haven.demolesions.segmentation`), dated
    ten minutes after the series so that a rerun writes the same bytes."""
    stamp = {"date": p["study"].strftime("%Y%m%d"), "time": _tm(p["t0"] + 95 + 600)}
    demolesions.segmentation(sources, masks, {**uids, **stamp}).save_as(path, enforce_file_format=True)
