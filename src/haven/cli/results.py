"""haven reidentify / haven report-sr: a prediction run's results for the clinician, in the PHI zone.

``reidentify`` is the one step that uses the key (the join goes through the keyed pseudonyms);
``report-sr`` reads only its output, the re-identified table, and the original files' headers.
"""

from __future__ import annotations

import json
from pathlib import Path

from haven.cli.common import settings, stage_args


def cmd_reidentify(args) -> int:
    from haven.predict.reidentify import reidentify

    counts = reidentify(Path(args.predictions), Path(args.ingest_manifest), Path(args.out),
                        settings(args, "reidentify"))
    print(json.dumps(counts))
    if counts["predictions"] and not counts["matched"]:
        raise ValueError(f"none of the {counts['predictions']} predictions matched a row of {args.ingest_manifest} "
                         f"under this key: it is not the key anonymize used (check key_file/key_env), or the "
                         f"manifest is another dataset's")
    return 0


def cmd_report_sr(args) -> int:
    from haven.predict.sr import store, write_reports

    from haven.learn.tasks import get_task

    s = settings(args, "reidentify")
    # a multi-label model's report states every finding; the others', the predicted class
    every = get_task(s.get("task", "classification"), s.get("task_options")).reports_every_class
    counts = write_reports(Path(args.reidentified), Path(args.source), Path(args.out), every_class=every)
    if s["predict"].get("store_sr") and args.store_url:
        if not args.pacs:
            raise ValueError("haven report-sr --store-url needs --pacs JSON (the source's pacs settings: login)")
        counts["stored"] = store(Path(args.out), args.store_url, json.loads(args.pacs))
    print(json.dumps(counts))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("reidentify", help="PHI zone: the predictions joined back to the original ids through "
                                          "the keyed pseudonyms (needs the project key)")
    p.add_argument("--predictions", required=True, help="the predict stage's predictions.csv")
    p.add_argument("--ingest-manifest", required=True, help="the predict source's ingest/manifest.csv (PHI zone)")
    p.add_argument("--out", required=True, help="predictions.reidentified.csv to write (PHI zone, mode 0600)")
    stage_args(p)
    p.set_defaults(func=cmd_reidentify)

    p = sub.add_parser("report-sr", help="PHI zone: one DICOM Structured Report per original study of the "
                                         "re-identified predictions (optionally stored to the PACS)")
    p.add_argument("--reidentified", required=True, help="haven reidentify's predictions.reidentified.csv")
    p.add_argument("--source", required=True, help="the folder the dataset was ingested from (the original files)")
    p.add_argument("--out", required=True, help="folder for the SR files and their index.csv (PHI zone)")
    p.add_argument("--store-url", help="dicomweb://... : STOW-RS the reports there when predict.store_sr is on")
    p.add_argument("--pacs", help="the source's pacs settings as JSON (login for --store-url)")
    stage_args(p)
    p.set_defaults(func=cmd_report_sr)
