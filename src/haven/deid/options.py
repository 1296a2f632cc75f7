"""anonymize's options: the section checked and completed from the schema, and the method codes
(CID 7050) that record which profile and options a file was de-identified under."""

from __future__ import annotations

from haven.config import section_defaults
from haven.deid import deface, redact
from haven.deid.profile import (
    CODE_BASIC, CODE_CLEAN_DESCRIPTORS, CODE_DEVICE_IDENTITY, CODE_MODIFIED_DATES, CODE_PATIENT_CHARACTERISTICS,
    CODE_RETAIN_UIDS, CODE_SAFE_PRIVATE, safe_private_table,
)


def options(given: dict | None) -> dict:
    """The anonymize section complete: ``given`` (validated settings, or a part of them by hand) over
    the schema's defaults, with the pixel and deface subsections checked and the Retain Safe Private
    allow-list compiled (``safe_private_table``)."""
    opts = section_defaults("anonymize")
    # safe_private_table: what this function adds, so an already completed section passes again
    unknown = set(given or {}) - set(opts) - {"safe_private_table"}
    if unknown:
        raise ValueError(f"unknown anonymize option(s): {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(opts)})")
    opts.update(given or {})
    opts["pixels"] = redact.options(opts["pixels"])
    opts["deface"] = deface.options(opts["deface"])
    opts["safe_private_table"] = safe_private_table(opts["safe_private"] or [])
    if int(opts["age_band_width"]) < 1 or int(opts["max_shift_days"]) < 1:
        raise ValueError("age_band_width and max_shift_days must be >= 1")
    return opts


# each option that adds a code to DeidentificationMethodCodeSequence, in the order files list them
_OPTION_CODES = (
    ("clean_descriptors", CODE_CLEAN_DESCRIPTORS),
    ("retain_longitudinal_modified_dates", CODE_MODIFIED_DATES),
    ("retain_patient_characteristics", CODE_PATIENT_CHARACTERISTICS),
    ("retain_device_identity", CODE_DEVICE_IDENTITY),
    ("retain_uids", CODE_RETAIN_UIDS),
    ("safe_private", CODE_SAFE_PRIVATE),
)


def method(opts: dict, pixels_cleaned: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """DeidentificationMethod values and the method codes of one file."""
    codes = [CODE_BASIC, *([redact.CODE_CLEAN_PIXELS] if pixels_cleaned else []),
             *(code for option, code in _OPTION_CODES if opts[option])]
    return method_values(codes), codes


def method_values(codes: list[tuple[str, str]]) -> list[str]:
    """DeidentificationMethod (LO, 1-n, at most 64 characters a value): the profile, then one
    value per option applied, each the meaning of its code in DeidentificationMethodCodeSequence."""
    return [f"haven: {codes[0][1]}", *(meaning for _, meaning in codes[1:])]
