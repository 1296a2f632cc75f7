"""The ``haven`` command line: one subcommand per stage, so every stage runs without Snakemake.

Each rule in ``rules/*.smk`` is one call of one of these subcommands.  Stage settings come
either from ``--params JSON`` (what the rules pass: the project's config sections, defaults
already filled in by the schema) or from ``--config FILE --project NAME`` (by hand).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("haven")


def _settings(args, stage: str | None = None) -> dict:
    """The stage's settings: --params JSON (what the rules pass), else --config/--project through the
    rules' own builder (haven.config.stage_settings), else the schema's defaults."""
    from haven import config as cfg

    stage = stage or args.command
    if getattr(args, "params", None):
        return json.loads(args.params)
    if getattr(args, "config", None):
        if not getattr(args, "project", None):
            raise cfg.ConfigError(f"--config needs --project NAME for haven {args.command}")
        return cfg.stage_settings(cfg.load(args.config), args.project, stage)
    return cfg.default_settings(stage, getattr(args, "source", "."))


def _tracking(s: dict, **extra) -> dict | None:
    if s.get("track") is False:
        return None
    keys = ("project", "experiment", "results", "config_hash")
    if not all(s.get(k) for k in keys):
        return None
    return {**{k: s[k] for k in keys}, "uri": s.get("tracking_uri"), **extra}


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", help="stage settings as JSON (what the Snakemake rules pass)")
    p.add_argument("--config", help="config file (instead of --params)")
    p.add_argument("--project", help="project name in the config (with --config)")
    p.add_argument("--rule", help="Snakemake rule name (an MLflow lineage tag)")


def cmd_keygen(args) -> int:
    from haven.keys import create_key

    existed = Path(args.path).exists()
    create_key(args.path)
    print(f"key {'already present' if existed else 'written'} at {args.path} (keep it secret, outside results)")
    return 0


def cmd_demo(args) -> int:
    from haven import demo

    out = Path(args.out)
    summary = demo.make_digits(out, seed=args.seed) if args.name == "digits" else demo.make_brain_ct(out, seed=args.seed)
    # counts only: the demo's details (sites, names) are the kind of PHI a log must not carry
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}))
    return 0


def cmd_ingest(args) -> int:
    from haven.ingest import ingest
    from haven.shards import parse_shard

    s = _settings(args)
    summary = ingest(Path(args.source), Path(args.out), labels=Path(s["labels"]) if s["labels"] else None,
                     label_key=s["label_key"], label_column=s["label_column"],
                     shard=parse_shard(args.shard))
    print(json.dumps(summary))
    return 0


def _key(s: dict) -> bytes:
    from haven.keys import create_key, load_key

    if s.get("demo_key") and s.get("key_file") and not (s.get("key_env") and os.environ.get(s["key_env"])):
        create_key(s["key_file"])
    return load_key(s.get("key_file"), s.get("key_env"))


def cmd_anonymize(args) -> int:
    from haven.deid.anonymize import anonymize
    from haven.shards import parse_shard

    s = _settings(args)
    summary = anonymize(Path(args.source), Path(args.ingest), Path(args.out), _key(s), s.get("anonymize", {}),
                        shard=parse_shard(args.shard), data_dir=Path(args.data) if args.data else None)
    print(json.dumps(summary))
    return 0


def cmd_merge(args) -> int:
    from haven import shards

    dirs, out = [Path(d) for d in args.shards], Path(args.out)
    if args.stage == "ingest":
        s = _settings(args, "ingest")
        summary = shards.merge_ingest(dirs, out, labels=Path(s["labels"]) if s["labels"] else None,
                                      label_key=s["label_key"], label_column=s["label_column"])
    else:
        summary = shards.merge_anonymize(dirs, out)
    print(json.dumps(summary))
    return 0


def cmd_audit(args) -> int:
    from haven.deid.audit import audit, write_audit_result

    anon = Path(args.anonymized)
    s = _settings(args)
    options = s["anonymize"]
    pixels = options.get("pixels") or {}
    result = audit(anon, Path(args.ingest), ocr_modalities=pixels.get("modalities"),
                   ocr=pixels.get("clean", "auto") != "off",
                   clean_descriptors=bool(options.get("clean_descriptors")),
                   retain_uids=bool(options.get("retain_uids")),
                   safe_private=options.get("safe_private") or None,
                   deface=options.get("deface") or None)
    passed = result["passed"]
    target = anon / ("audit.json" if passed else "audit.failed.json")
    (anon / ("audit.failed.json" if passed else "audit.json")).unlink(missing_ok=True)
    write_audit_result(result, target)
    if not passed:
        for f in result["findings"][:50]:
            print(f"LEAK {f['file']}: {f['where']} ({f.get('kind', '')})", file=sys.stderr)
        print(f"audit FAILED: {len(result['findings'])} finding(s) in {result['files']} file(s); "
              f"details (without values) in {target}", file=sys.stderr)
        return 1
    print(f"audit passed: {result['files']} file(s), 0 findings")
    return 0


def cmd_preprocess(args) -> int:
    from haven.learn.preprocess import preprocess

    s = _settings(args)
    params = dict(s["preprocess"])
    if args.workers:  # the rule passes its threads: the CPUs the (Slurm) job was given
        params["workers"] = args.workers
    stats = preprocess(Path(args.anonymized), Path(args.out), params, seed=s["seed"])
    print(json.dumps(stats["samples"]))
    return 0


def _data_hash(pre: Path) -> str | None:
    stats = pre / "stats.json"
    return json.loads(stats.read_text()).get("data_manifest_hash") if stats.is_file() else None


def cmd_tune(args) -> int:
    import subprocess

    from haven.learn.tune import slurm_multinode_command, tune_project

    s = _settings(args)
    _lineage(args, s)
    if not args.ray_address:
        # a Slurm job over several nodes: Ray on every node (ray symmetric-run), this command on the head
        multi = slurm_multinode_command(args.argv)
        if multi:
            log.info("multi-node Slurm job: %s", " ".join(multi))
            return subprocess.run(multi).returncode
    pre = Path(args.preprocessed)
    summary = tune_project(pre, Path(args.out), s["model"], s["train"], s["tune"], seed=s["seed"],
                           tracking=_tracking(s, data_hash=_data_hash(pre)), cpus=args.cpus,
                           ray_address=args.ray_address, fresh=args.fresh)
    print(json.dumps({k: summary[k] for k in ("config", "metric", "value", "trials", "trial_epochs")}, default=str))
    return 0


def cmd_train(args) -> int:
    import yaml

    from haven.learn.train import train

    s = _settings(args)
    nproc = _train_processes(args, s["train"])
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        # data parallel: the same command once per GPU under torchrun (one node; rank 0 writes)
        import subprocess

        argv = list(args.argv)
        if "--nproc" in argv:  # the ranks need no --nproc (and torchrun would take it for its own)
            at = argv.index("--nproc")
            del argv[at:at + 2]
        argv = [a for a in argv if not a.startswith("--nproc=")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "haven.cli", *argv]
        log.info("train: %d data-parallel processes (torchrun)", nproc)
        return subprocess.call(cmd)
    _lineage(args, s)
    pre = Path(args.preprocessed)
    tune_run = None
    if args.best_config:
        tune_run = (yaml.safe_load(Path(args.best_config).read_text()) or {}).get("mlflow_run_id")
    summary = train(pre, Path(args.out), s["model"], s["train"], best_config=args.best_config,
                    seed=s["seed"], tracking=_tracking(s, data_hash=_data_hash(pre), tune_run_id=tune_run))
    if summary:  # rank 0 (the others return nothing)
        print(json.dumps({k: summary[k] for k in ("best_epoch", "best_val_balanced_accuracy", "epochs_run")}))
    return 0


def _train_processes(args, train_cfg: dict) -> int:
    """Data-parallel processes: --nproc, else config train.ddp (auto: one per visible GPU when several)."""
    if args.nproc:
        return args.nproc
    ddp = train_cfg.get("ddp", "auto")
    if ddp == "off":
        return 1
    if isinstance(ddp, int):
        return ddp
    from haven.learn.tune import allocated_gpus

    return max(1, allocated_gpus())


def cmd_evaluate(args) -> int:
    from haven.trust.evaluate import evaluate

    s = _settings(args)
    _lineage(args, s)
    run = json.loads(Path(args.run).read_text()).get("mlflow_run_id") if args.run else None
    metrics = evaluate(Path(args.model), Path(args.preprocessed), Path(args.out), tracking=_tracking(s, train_run_id=run),
                       settings=s.get("evaluate"), seed=s["seed"])
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "roc_auc")}))
    return 0


def cmd_report(args) -> int:
    from haven.report.page import project_report

    s = _settings(args)
    path = project_report(Path(args.results), Path(args.out), s)
    print(f"report written to {path}")
    return 0


def cmd_register(args) -> int:
    from haven.track import register_model

    s = _settings(args)
    _lineage(args, s)
    tracking = _tracking(s)
    if tracking is None:
        raise ValueError("register needs the project's tracking settings (project, experiment, results)")
    prefix = args.prefix if args.prefix is not None else s["registry_prefix"]
    metric = args.metric or s["best_metric"]
    info = register_model(Path(args.results), tracking, f"{prefix}{s['project']}", metric=metric)
    out = Path(args.out)
    from haven.io import atomic_write_text

    atomic_write_text(out, json.dumps(info, indent=2, default=str))
    print(f"registered {info['name']} version {info['version']} ({info['alias']}: version {info['champion_version']})")
    return 0


def cmd_compare(args) -> int:
    from haven.io import atomic_write_text
    from haven.track import compare, format_comparison

    from haven import config as cfg

    if args.params:
        s = json.loads(args.params)
    elif args.config:
        s = cfg.compare_settings(cfg.load(args.config))
    else:
        raise SystemExit("give the projects with --params JSON or --config FILE")
    df = compare(s["projects"], s["results"], s["tracking_uri"], metric=s["best_metric"],
                 registry_prefix=s["registry_prefix"])
    out = Path(args.out) if args.out else Path(s["results"]) / "compare.csv"
    atomic_write_text(out, df.to_csv(index=False))
    print(format_comparison(df))
    print(f"\nwritten to {out}")
    return 0


def _lineage(args, s: dict | None = None) -> None:
    """Snakemake rule and wildcards for the lineage tags (rules pass --rule; the wildcard is the project)."""
    if getattr(args, "rule", None):
        os.environ["HAVEN_RULE"] = args.rule
        project = (s or {}).get("project") or getattr(args, "project", None)
        if project:
            os.environ.setdefault("HAVEN_WILDCARDS", f"project={project}")


def cmd_profile(args) -> int:
    from haven import cluster

    if args.action == "site":
        site = cluster.site_settings()
        print(f"site file: {cluster.site_file()} ({'found' if cluster.site_file().is_file() else 'absent'})")
        for kind in ("cpu", "gpu"):
            res = cluster.rule_resources(kind, site)
            print(f"{kind} rules: " + (" ".join(f"{k}={v}" for k, v in res.items()) or "(nothing set)"))
        return 0
    written = cluster.install_profiles(args.names, Path(args.dest) if args.dest else None, force=args.force)
    for target in written:
        print(f"installed {target}: `snakemake --profile {target.name}` now uses it")
    print(f"site values (partition, account, GPU model): {cluster.site_file()} or HAVEN_SLURM_* variables "
          "(`haven profile site` shows what the rules will ask for)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haven", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a pseudonymization key file (if missing)")
    p.add_argument("path")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("profile", help="install the Snakemake profiles where `--profile NAME` finds them; "
                                       "show the site's Slurm values")
    p.add_argument("action", choices=["install", "site"])
    p.add_argument("names", nargs="*", default=["slurm", "local"], help="profiles to install (default: slurm local)")
    p.add_argument("--dest", help="profile folder (default: $XDG_CONFIG_HOME/snakemake, i.e. ~/.config/snakemake)")
    p.add_argument("--force", action="store_true", help="replace an installed profile that differs")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("demo", help="generate a demo dataset from packages (no download)")
    p.add_argument("name", choices=["digits", "brain-ct"])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ingest", help="walk a source folder into a manifest; quarantine unreadable files")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--shard", help="I/N: only the files of shard I of N (merge the shards with `haven merge`)")
    _stage_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("anonymize", help="de-identify every ingested file (keyed pseudonyms, date shifts)")
    p.add_argument("source")
    p.add_argument("ingest", help="the ingest stage's output folder")
    p.add_argument("out")
    p.add_argument("--shard", help="I/N: only the inputs of shard I of N (merge the shards with `haven merge`)")
    p.add_argument("--data", help="folder for the de-identified files (default: OUT/data)")
    _stage_args(p)
    p.set_defaults(func=cmd_anonymize)

    p = sub.add_parser("merge", help="merge the tables of ingest or anonymize shards into the stage's outputs")
    p.add_argument("stage", choices=["ingest", "anonymize"])
    p.add_argument("out", help="the stage's output folder")
    p.add_argument("shards", nargs="+", help="the shards' output folders")
    p.add_argument("--params", help="ingest: the label settings as JSON (to count label rows no file matched)")
    p.add_argument("--config", help="config file (instead of --params)")
    p.add_argument("--project", help="project name in the config (with --config)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("audit", help="re-scan anonymized output for any original identifier; exit 1 on a leak")
    p.add_argument("anonymized")
    p.add_argument("--ingest", required=True, help="the ingest stage's output folder (identifiers seen)")
    _stage_args(p)  # optional: anonymize.pixels.modalities are the files whose pixel text is read (OCR)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("preprocess", help="audited data → patient-level splits → Zarr shards (Dask)")
    p.add_argument("anonymized")
    p.add_argument("out")
    p.add_argument("--workers", type=int, help="Dask worker processes (default: config preprocess.workers; "
                                               "the rule passes its threads)")
    _stage_args(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("tune", help="Ray Tune search (ASHA + Optuna) → best_config.yaml")
    p.add_argument("preprocessed")
    p.add_argument("out")
    p.add_argument("--cpus", type=int,
                   help="CPUs Ray may use (the rule passes its threads; Slurm's allocation caps it)")
    p.add_argument("--ray-address", help="run the trials on this Ray cluster (`auto`, or HOST:PORT of a head) "
                                         "instead of a private single-node one")
    p.add_argument("--fresh", action="store_true", help="discard an interrupted search instead of resuming it")
    _stage_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("train", help="transfer learning with the tuned hyperparameters → model.pt")
    p.add_argument("preprocessed")
    p.add_argument("out")
    p.add_argument("--best-config", help="the tune stage's best_config.yaml")
    p.add_argument("--nproc", type=int, help="data-parallel processes under torchrun (default: config train.ddp; "
                                             "auto = one per visible GPU when there are several)")
    _stage_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-split metrics and plots, logged to MLflow")
    p.add_argument("model")
    p.add_argument("preprocessed")
    p.add_argument("out")
    p.add_argument("--run", help="the train stage's run.json (MLflow run to log into)")
    _stage_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="per-project HTML summary and model card")
    p.add_argument("results", help="the project's results folder")
    p.add_argument("out")
    _stage_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("register", help="register the project's model in the MLflow model registry")
    p.add_argument("results", help="the project's results folder")
    p.add_argument("out", help="where to write registered.json")
    p.add_argument("--prefix", help="registered model name = PREFIX + project (default: config registry_prefix)")
    p.add_argument("--metric", help="metric that picks the `champion` version (default: config best_metric)")
    _stage_args(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("compare", help="each project's best run and its metrics side by side (→ compare.csv)")
    p.add_argument("--params", help="settings as JSON (what the Snakemake rule passes)")
    p.add_argument("--config", help="config file (instead of --params)")
    p.add_argument("--out", help="CSV to write (default: <results>/compare.csv)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("distributed", "ray", "mlflow", "alembic", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from haven.cluster import SiteError
    from haven.config import ConfigError
    from haven.keys import KeyError_

    try:
        return int(args.func(args) or 0)
    except (ConfigError, SiteError, KeyError_, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"haven {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
