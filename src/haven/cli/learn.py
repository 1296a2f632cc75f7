"""haven preprocess, tune and train."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from haven.cli.common import settings, tracking, stage_args, data_hash, lineage

log = logging.getLogger("haven")


def cmd_preprocess(args) -> int:
    from haven.learn.preprocess import Inputs, Outputs, preprocess

    s = settings(args)
    params = dict(s["preprocess"])
    if args.workers:  # the rule passes its threads: the CPUs the (Slurm) job was given
        params["workers"] = args.workers
    inputs = Inputs(Path(args.manifest), Path(args.audit), Path(args.data))
    outputs = Outputs(*(Path(getattr(args, k)) for k in ("train", "val", "test", "splits", "stats")))
    stats = preprocess(inputs, outputs, params, seed=s["seed"], task=s["task"], task_options=s.get("task_options"))
    print(json.dumps(stats["samples"]))
    return 0


def cmd_tune(args) -> int:
    from haven.learn.launch import relaunch_tune
    from haven.learn.tasks import get_task
    from haven.learn.tune import TuneFiles, tune_project

    s = settings(args)
    lineage(args, s)
    if not args.ray_address:
        rc = relaunch_tune(args.argv)  # a multi-node Slurm job: Ray on every node, this command on the head
        if rc is not None:
            return rc
    files = TuneFiles(train=Path(args.train), val=Path(args.val), stats=Path(args.stats), best=Path(args.best),
                      trials=Path(args.trials), history=Path(args.history), plot=Path(args.plot),
                      storage=Path(args.ray_storage or Path(args.best).parent / "ray"),
                      splits=Path(args.splits) if args.splits else None)
    task = get_task(s["task"], s.get("task_options"))
    summary = tune_project(files, s["model"], s["train"], s["tune"], task=task, seed=s["seed"],
                           tracking=tracking(s, data_hash=data_hash(files.stats)), cpus=args.cpus,
                           ray_address=args.ray_address, fresh=args.fresh)
    print(json.dumps({k: summary[k] for k in ("config", "metric", "value", "trials", "trial_epochs")}, default=str))
    return 0


def cmd_train(args) -> int:
    import yaml

    from haven.learn.launch import relaunch_train
    from haven.learn.tasks import get_task
    from haven.learn.train import TrainFiles, train

    s = settings(args)
    rc = relaunch_train(args.argv, args.nproc, s["train"])  # several GPUs: once per GPU under torchrun
    if rc is not None:
        return rc
    lineage(args, s)
    train_stores = [Path(t) for t in args.train]
    files = TrainFiles(train=train_stores[0] if len(train_stores) == 1 else train_stores, val=Path(args.val),
                       stats=Path(args.stats), model=Path(args.model),
                       history=Path(args.history), run=Path(args.summary),
                       workdir=Path(args.workdir or Path(args.model).parent),
                       best_config=Path(args.best_config) if args.best_config else None,
                       splits=Path(args.splits) if args.splits else None)
    tune_run = None
    if files.best_config:
        tune_run = (yaml.safe_load(files.best_config.read_text()) or {}).get("mlflow_run_id")
    task = get_task(s["task"], s.get("task_options"))
    summary = train(files, s["model"], s["train"], task=task, seed=s["seed"],
                    tracking=tracking(s, data_hash=data_hash(files.stats), tune_run_id=tune_run, fold=args.fold))
    if summary:  # rank 0 (the others return nothing)
        print(json.dumps({k: summary[k] for k in ("best_epoch", f"best_{task.val_metric}", "epochs_run")}))
    return 0


def _data_args(p, several: bool = False) -> None:
    """The preprocess stage's files a learning stage reads (the rules pass each one); ``several``:
    the train split may be several stores (a cross-validation fold trains on the other folds)."""
    if several:
        p.add_argument("--train", required=True, nargs="+", help="the train split's Zarr store(s) (preprocess/"
                                                                 "train.zarr; a fold: the other folds' stores)")
    else:
        p.add_argument("--train", required=True, help="the train split's Zarr store (preprocess/train.zarr)")
    p.add_argument("--val", required=True, help="the validation split's Zarr store (preprocess/val.zarr)")
    p.add_argument("--stats", required=True, help="preprocess/stats.json (the data's identity)")
    p.add_argument("--splits", help="preprocess/splits.csv: logged to MLflow as the run's input datasets")


def add_commands(sub) -> None:
    p = sub.add_parser("preprocess", help="audited data → patient-level splits → Zarr shards (Dask)")
    p.add_argument("--manifest", required=True, help="the anonymize stage's manifest (CSV)")
    p.add_argument("--audit", required=True, help="the audit's audit.json: preprocess reads nothing that did not pass")
    p.add_argument("--data", required=True, help="the folder the manifest's `file` column is relative to")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", required=True, help=f"the {split} split's Zarr store to write")
    p.add_argument("--splits", required=True, help="the table of every file's split to write (CSV)")
    p.add_argument("--stats", required=True, help="the classes, counts and normalization statistics to write (JSON)")
    p.add_argument("--workers", type=int, help="Dask worker processes (default: config preprocess.workers; "
                                               "the rule passes its threads)")
    stage_args(p)
    p.set_defaults(func=cmd_preprocess)
    p = sub.add_parser("tune", help="Ray Tune search (ASHA + Optuna) → best_config.yaml")
    _data_args(p)
    p.add_argument("--best", required=True, help="output: the best configuration (best_config.yaml)")
    p.add_argument("--trials", required=True, help="output: one row per trial (trials.csv)")
    p.add_argument("--history", required=True, help="output: one row per trial epoch (history.csv)")
    p.add_argument("--plot", required=True, help="output: the search plot (search.png)")
    p.add_argument("--ray-storage", help="Ray's search state and trial checkpoints, on a filesystem every node "
                                         "shares (default: ray/ beside --best); a killed search resumes from it")
    p.add_argument("--cpus", type=int,
                   help="CPUs Ray may use (the rule passes its threads; Slurm's allocation caps it)")
    p.add_argument("--ray-address", help="run the trials on this Ray cluster (`auto`, or HOST:PORT of a head) "
                                         "instead of a private single-node one")
    p.add_argument("--fresh", action="store_true", help="discard an interrupted search instead of resuming it")
    stage_args(p)
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("train", help="transfer learning with the tuned hyperparameters → model.pt")
    _data_args(p, several=True)
    p.add_argument("--best-config", help="the tune stage's best_config.yaml")
    p.add_argument("--model", required=True, help="output: the trained model (model.pt)")
    p.add_argument("--history", required=True, help="output: one row per epoch (history.csv)")
    # not --run: torchrun (the re-launch over several GPUs) would take it for its --run-path
    p.add_argument("--summary", required=True, help="output: the run's summary (run.json)")
    p.add_argument("--workdir", help="holds checkpoints/ (last.pt, from which a killed run resumes; best.pt) "
                                     "(default: the folder of --model)")
    p.add_argument("--fold", type=int, help="the cross-validation fold this run is (its MLflow run's name and tag)")
    p.add_argument("--nproc", type=int, help="data-parallel processes under torchrun (default: config train.ddp; "
                                             "auto = one per visible GPU when there are several)")
    stage_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("folds", help="cross-validation: the train split's patients in K folds, one Zarr store each")
    p.add_argument("--train", required=True, help="the train split's Zarr store (preprocess/train.zarr)")
    p.add_argument("--out", required=True, help="output: the folder of the fold stores (<k>.zarr)")
    p.add_argument("--table", required=True, help="output: pseudonymous patient → fold (folds.csv)")
    stage_args(p)
    p.set_defaults(func=cmd_folds)
    p = sub.add_parser("ensemble", help="cross-validation: the fold models as one ensemble model.pt")
    p.add_argument("--fold-model", required=True, nargs="+", help="every fold's model.pt, in fold order")
    p.add_argument("--fold-run", required=True, nargs="+", help="every fold's run.json, in fold order")
    p.add_argument("--fold-history", required=True, nargs="+", help="every fold's history.csv, in fold order")
    p.add_argument("--folds", required=True, help="the folds table (folds.csv), logged with the ensemble")
    p.add_argument("--stats", required=True, help="preprocess/stats.json (the data's identity)")
    p.add_argument("--model", required=True, help="output: the ensemble (model.pt)")
    p.add_argument("--history", required=True, help="output: every fold's epochs (history.csv)")
    p.add_argument("--summary", required=True, help="output: the cross-validation summary (run.json)")
    stage_args(p)
    p.set_defaults(func=cmd_ensemble)


def cmd_folds(args) -> int:
    from haven.config import cv_folds
    from haven.learn.folds import make_folds

    s = settings(args)
    lineage(args, s)
    counts = make_folds(args.train, args.out, args.table, cv_folds(s), seed=s["seed"])
    print(json.dumps(counts))
    return 0


def cmd_ensemble(args) -> int:
    from haven.learn.ensemble import EnsembleFiles, assemble
    from haven.learn.tasks import get_task

    s = settings(args)
    lineage(args, s)
    files = EnsembleFiles(models=[Path(p) for p in args.fold_model], runs=[Path(p) for p in args.fold_run],
                          histories=[Path(p) for p in args.fold_history], folds=Path(args.folds),
                          model=Path(args.model), history=Path(args.history), run=Path(args.summary))
    task = get_task(s["task"], s.get("task_options"))
    summary = assemble(files, task, tracking=tracking(s, data_hash=data_hash(Path(args.stats))))
    print(json.dumps({k: summary["cv"][k] for k in ("folds", "metric", "mean", "sd")}))
    return 0
