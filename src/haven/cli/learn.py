"""haven preprocess, tune and train."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from haven.cli.common import settings, tracking, stage_args, data_hash, lineage

log = logging.getLogger("haven")


def cmd_preprocess(args) -> int:
    from haven.learn.preprocess import preprocess

    s = settings(args)
    params = dict(s["preprocess"])
    if args.workers:  # the rule passes its threads: the CPUs the (Slurm) job was given
        params["workers"] = args.workers
    stats = preprocess(Path(args.anonymized), Path(args.out), params, seed=s["seed"])
    print(json.dumps(stats["samples"]))
    return 0


def cmd_tune(args) -> int:
    import subprocess

    from haven.learn.tune import slurm_multinode_command, tune_project

    s = settings(args)
    lineage(args, s)
    if not args.ray_address:
        # a Slurm job over several nodes: Ray on every node (ray symmetric-run), this command on the head
        multi = slurm_multinode_command(args.argv)
        if multi:
            log.info("multi-node Slurm job: %s", " ".join(multi))
            return subprocess.run(multi).returncode
    pre = Path(args.preprocessed)
    summary = tune_project(pre, Path(args.out), s["model"], s["train"], s["tune"], seed=s["seed"],
                           tracking=tracking(s, data_hash=data_hash(pre)), cpus=args.cpus,
                           ray_address=args.ray_address, fresh=args.fresh)
    print(json.dumps({k: summary[k] for k in ("config", "metric", "value", "trials", "trial_epochs")}, default=str))
    return 0


def cmd_train(args) -> int:
    import yaml

    from haven.learn.train import train

    s = settings(args)
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
    lineage(args, s)
    pre = Path(args.preprocessed)
    tune_run = None
    if args.best_config:
        tune_run = (yaml.safe_load(Path(args.best_config).read_text()) or {}).get("mlflow_run_id")
    summary = train(pre, Path(args.out), s["model"], s["train"], best_config=args.best_config,
                    seed=s["seed"], tracking=tracking(s, data_hash=data_hash(pre), tune_run_id=tune_run))
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


def add_commands(sub) -> None:
    p = sub.add_parser("preprocess", help="audited data → patient-level splits → Zarr shards (Dask)")
    p.add_argument("anonymized")
    p.add_argument("out")
    p.add_argument("--workers", type=int, help="Dask worker processes (default: config preprocess.workers; "
                                               "the rule passes its threads)")
    stage_args(p)
    p.set_defaults(func=cmd_preprocess)
    p = sub.add_parser("tune", help="Ray Tune search (ASHA + Optuna) → best_config.yaml")
    p.add_argument("preprocessed")
    p.add_argument("out")
    p.add_argument("--cpus", type=int,
                   help="CPUs Ray may use (the rule passes its threads; Slurm's allocation caps it)")
    p.add_argument("--ray-address", help="run the trials on this Ray cluster (`auto`, or HOST:PORT of a head) "
                                         "instead of a private single-node one")
    p.add_argument("--fresh", action="store_true", help="discard an interrupted search instead of resuming it")
    stage_args(p)
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("train", help="transfer learning with the tuned hyperparameters → model.pt")
    p.add_argument("preprocessed")
    p.add_argument("out")
    p.add_argument("--best-config", help="the tune stage's best_config.yaml")
    p.add_argument("--nproc", type=int, help="data-parallel processes under torchrun (default: config train.ddp; "
                                             "auto = one per visible GPU when there are several)")
    stage_args(p)
    p.set_defaults(func=cmd_train)

