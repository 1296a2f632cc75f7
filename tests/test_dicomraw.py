"""The byte-level DICOM writer that anonymize uses must write exactly what pydicom writes."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from haven.deid import dicomfile, dicomraw, writer
from haven.deid.errors import AnonymizeError
from haven.deid.options import options as deid_options

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent


def _inputs() -> list[Path]:
    import deid_data

    files = [p for p in sorted(TEST_FILES.rglob("*")) if p.is_file()]
    files += sorted((Path(deid_data.__file__).parent / "data").rglob("*.dcm"))
    return files


def _deidentified(path: Path, options: dict):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds, _, _, meta = dicomfile.deidentify_dicom(path, {"patient_id": "P1"}, b"k" * 32,
                                                      deid_options(options), {})
            writer.fix_encoding(ds, meta.transfer_syntax)
    except AnonymizeError:
        return None
    return ds, meta


@pytest.mark.parametrize("options", [{}, {"clean_descriptors": True, "retain_device_identity": True,
                                          "retain_longitudinal_modified_dates": True}])
def test_raw_writer_output_equals_pydicom_save_as(options):
    """Every file of pydicom's test files and deid-data that anonymize accepts: the raw writer's
    bytes equal pydicom's ``save_as(enforce_file_format=True)`` of the same data set, or the writer
    declines (big endian, deflate, another encoding) and anonymize uses pydicom."""
    written = declined = 0
    for path in _inputs():
        got = _deidentified(path, options)
        if got is None:
            continue
        ds, meta = got
        out = io.BytesIO()
        try:
            header = dicomraw.file_meta(meta.sop_class, meta.sop_instance, meta.transfer_syntax,
                                        pydicom.uid.PYDICOM_IMPLEMENTATION_UID, writer.IMPLEMENTATION_NAME)
            dicomraw.write_file(out, ds, header, pydicom.uid.UID(meta.transfer_syntax))
        except dicomraw.Unsupported:
            declined += 1
            continue
        ref = copy.deepcopy(ds)
        ref.file_meta = pydicom.dataset.FileMetaDataset()
        ref.file_meta.MediaStorageSOPClassUID = meta.sop_class
        ref.file_meta.MediaStorageSOPInstanceUID = meta.sop_instance
        ref.file_meta.TransferSyntaxUID = meta.transfer_syntax
        ref.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ref.file_meta.ImplementationVersionName = writer.IMPLEMENTATION_NAME
        ref.preamble = b"\x00" * 128
        expected = io.BytesIO()
        ref.save_as(expected, enforce_file_format=True)
        assert out.getvalue() == expected.getvalue(), path.name
        written += 1
    assert written >= 90  # implicit and explicit VR, JPEG, JPEG-LS, JPEG 2000, RLE, sequences
    assert declined <= 15


def test_raw_writer_declines_big_endian_and_deflate():
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):
        ds, meta = _deidentified(Path(get_testdata_file(name)), {})
        with pytest.raises(dicomraw.Unsupported):
            dicomraw.write_file(io.BytesIO(), ds, b"", pydicom.uid.UID(meta.transfer_syntax))


def test_raw_strings_decode_like_pydicom():
    for raw, vr in [(b"1.2.3\x00", "UI"), (b"1.2.3\\4.5 ", "UI"), (b"20200101", "DA"),
                    (b"20200101\\20210202", "DA"), (b"", "DA"), (b" ORIGINAL\\PRIMARY ", "CS")]:
        elem = pydicom.dataelem.RawDataElement(pydicom.tag.BaseTag(0x00080018), vr, len(raw), raw, 0,
                                               False, True)
        value = pydicom.dataelem.convert_raw_data_element(elem).value
        want = [] if value in ("", None) else [str(v) for v in (value if not isinstance(value, str) else [value])]
        assert dicomraw.strings(raw, vr) == want, raw


def test_new_text_element_pads_like_pydicom():
    assert dicomraw.text_element(0x00080018, "UI", ["1.2.3"], False).value == b"1.2.3\x00"
    assert dicomraw.text_element(0x00100020, "LO", ["ABC"], True).value == b"ABC "
    assert dicomraw.text_element(0x00080008, "CS", ["A", "B"], False).value == b"A\\B "
    assert dicomraw.text_element(0x00100010, "PN", ["Müller"], False) is None  # not ASCII: DataElement
