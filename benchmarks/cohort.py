"""A synthetic cohort of many small DICOM files, for the scale benchmarks (dag_scale, ingest).

Every file is a real, readable CT slice (8x8 pixels, explicit VR little endian) with its own
patient, study, series and instance UIDs and PHI-like header values; they are written from one
encoded template by replacing fixed-width fields, so 100,000 files take seconds, not minutes.
"""

from __future__ import annotations

from pathlib import Path

#: fixed-width placeholders in the template, replaced per file (same length, so the encoding stays valid)
_FIELDS = {
    "patient": "PAT0000000",
    "study": "1.2.826.0.1.3680043.10.1000.1000000001",
    "series": "1.2.826.0.1.3680043.10.1000.2000000001",
    "sop": "1.2.826.0.1.3680043.10.1000.3000000001",
    "accession": "ACC0000000",
}


def _template() -> bytes:
    import io

    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = _FIELDS["sop"]
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, _FIELDS["sop"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _FIELDS["study"], _FIELDS["series"]
    ds.PatientID, ds.AccessionNumber = _FIELDS["patient"], _FIELDS["accession"]
    ds.PatientName = "DOE^JANE"
    ds.PatientBirthDate, ds.StudyDate, ds.PatientSex = "19600101", "20200301", "F"
    ds.InstitutionName = "Example General Hospital"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (np.arange(64, dtype=np.uint16) * 10 + 1000).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def make_cohort(root: Path, n_files: int, per_patient: int = 10) -> Path:
    """``root/P<patient>/<i>.dcm`` for ``n_files`` files (reused when already complete); returns root."""
    root = Path(root)
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(n_files):
        return root
    template = _template()
    for name, value in _FIELDS.items():
        assert template.count(value.encode()) >= 1, name
    for i in range(n_files):
        p = i // per_patient
        data = template
        values = {"patient": f"PAT{p:07d}", "accession": f"ACC{p:07d}",
                  "study": f"{_FIELDS['study'][:-10]}{1_000_000_001 + p}",
                  "series": f"{_FIELDS['series'][:-10]}{2_000_000_001 + p}",
                  "sop": f"{_FIELDS['sop'][:-10]}{3_000_000_001 + i}"}
        for name, value in values.items():
            data = data.replace(_FIELDS[name].encode(), value.encode())
        folder = root / f"P{p:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i % per_patient}.dcm").write_bytes(data)
    done.write_text(str(n_files))
    return root
