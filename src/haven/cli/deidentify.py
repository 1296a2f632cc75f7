"""haven deid SRC DST: de-identify an export in one line (ingest, anonymize, audit; no Snakemake)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# flag -> its key in the schema's `anonymize` section (dots: a subsection)
FLAGS = {
    "retain_uids": "retain_uids",
    "clean_descriptors": "clean_descriptors",
    "retain_device_identity": "retain_device_identity",
    "retain_patient_characteristics": "retain_patient_characteristics",
    "retain_longitudinal_modified_dates": "retain_longitudinal_modified_dates",
    "age_band_width": "age_band_width",
    "max_shift_days": "max_shift_days",
    "pixels": "pixels.clean",
    "ocr": "pixels.ocr",
    "deface": "deface.enabled",
    "deface_volumes": "deface.volumes",
}


class _SchemaDefaults(argparse.HelpFormatter):
    """Help that shows each option's default as the schema gives it, read only when help is shown
    (so every other `haven` command does not load the schema)."""

    def _get_help_string(self, action):
        key = FLAGS.get(action.dest)
        if key is None:
            return action.help
        from haven.config import section_defaults

        value = section_defaults("anonymize", *key.split("."))
        return f"{action.help} (default: {value}, the schema's anonymize.{key})"


def _options(args) -> dict:
    """The anonymize section: the --options file, then the flags given; the schema fills in the rest."""
    section: dict = {}
    if args.options:
        import yaml

        path = Path(args.options)
        if not path.is_file():
            raise FileNotFoundError(f"options file {path} not found: give a YAML file holding an `anonymize:` section")
        loaded = yaml.safe_load(path.read_text()) or {}
        section = loaded.get("anonymize", loaded) if isinstance(loaded, dict) else None
        if not isinstance(section, dict):
            raise ValueError(f"options file {path}: expected the anonymize options as a mapping (see the schema)")
    for dest, key in FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        *parents, leaf = key.split(".")
        target = section
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    return section


def _key(args) -> bytes:
    from haven.config import default_settings
    from haven.keys import KeyError_, load_key

    env = args.key_env or default_settings("anonymize")["key_env"]
    if not args.key_file and not os.environ.get(env):
        raise KeyError_(f"no key: give --key-file K (create one with `haven keygen K`, kept outside DST) "
                        f"or set the environment variable {env}")
    return load_key(args.key_file, env)


def cmd_deid(args) -> int:
    from haven.deid.oneshot import deidentify

    s = deidentify(Path(args.src), Path(args.dst), _key(args), options=_options(args),
                   work=Path(args.work) if args.work else None)
    if args.json:
        print(json.dumps(s))
    else:
        print(f"{s['files']} file(s) in, {s['deidentified']} de-identified, {s['quarantined']} quarantined "
              f"({s['quarantined_at_ingest']} at ingest, {s['quarantined_at_anonymize']} at anonymize); "
              f"{s['files_per_second']} files/s")
        print(f"audit {'passed' if s['audit_passed'] else 'FAILED'}: {s['findings']} finding(s), see {s['audit']}")
        print(f"de-identified files: {s['data']} (manifest {s['manifest']})")
        print(f"PHI zone (original identifiers; keep private, do not hand on): {s['phi']}")
    return 0 if s["audit_passed"] else 1


def add_commands(sub) -> None:
    p = sub.add_parser("deid", formatter_class=_SchemaDefaults,
                       help="de-identify a folder in one line: ingest, anonymize, audit (exit 0 only when the audit passed)",
                       description="De-identify the files of SRC into DST/data (PS3.15 basic profile with the "
                                   "options below), quarantining what cannot be made safe, then audit the result. "
                                   "The PHI-zone tables go to a private folder outside DST (--work).")
    p.add_argument("src", help="the export: a folder of DICOM files, images or NIfTI volumes (any layout, or a BIDS dataset)")
    p.add_argument("dst", help="folder for the de-identified files, manifest.csv and audit.json")
    p.add_argument("--key-file", help="the pseudonymization key (create one with `haven keygen K`)")
    p.add_argument("--key-env", help="environment variable holding the key (default: the schema's key_env, HAVEN_KEY); "
                                     "wins over --key-file when set")
    p.add_argument("--work", help="private folder for the PHI-zone tables (default: DST/../.haven-<DST name>-phi)")
    p.add_argument("--options", help="YAML file with an `anonymize:` section as in config.yaml (flags override it)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    bools = {"retain_uids": "PS3.15 Retain UIDs: keep the original UIDs",
             "clean_descriptors": "PS3.15 Clean Descriptors: keep descriptions with identifying values cut out",
             "retain_device_identity": "PS3.15 Retain Device Identity (keyed tokens)",
             "retain_patient_characteristics": "PS3.15 Retain Patient Characteristics (sex, age band, size)",
             "retain_longitudinal_modified_dates": "PS3.15 Retain Longitudinal Temporal Information, Modified Dates "
                                                   "(per-patient date shift)",
             "ocr": "read burned-in pixel text by OCR", "deface": "deface 3D head volumes (DICOM series and NIfTI)",
             "deface_volumes": "deface NIfTI head MR volumes (T1w, T2w, FLAIR...) even without --deface"}
    for dest, text in bools.items():
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, action=argparse.BooleanOptionalAction,
                       default=None, help=text)
    p.add_argument("--pixels", choices=["auto", "all", "off"], default=None, help="PS3.15 Clean Pixel Data: which files")
    p.add_argument("--age-band-width", type=int, default=None, help="years per age band")
    p.add_argument("--max-shift-days", type=int, default=None, help="largest per-patient date shift")
    p.set_defaults(func=cmd_deid)
