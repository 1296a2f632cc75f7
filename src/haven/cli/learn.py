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
    stats = preprocess(inputs, outputs, params, seed=s["seed"], task=s["task"])
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
    summary = tune_project(files, s["model"], s["train"], s["tune"], task=get_task(s["task"]), seed=s["seed"],
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
    files = TrainFiles(train=Path(args.train), val=Path(args.val), stats=Path(args.stats), model=Path(args.model),
                       history=Path(args.history), run=Path(args.summary),
                       workdir=Path(args.workdir or Path(args.model).parent),
                       best_config=Path(args.best_config) if args.best_config else None,
                       splits=Path(args.splits) if args.splits else None)
    tune_run = None
    if files.best_config:
        tune_run = (yaml.safe_load(files.best_config.read_text()) or {}).get("mlflow_run_id")
    task = get_task(s["task"])
    summary = train(files, s["model"], s["train"], task=task, seed=s["seed"],
                    tracking=tracking(s, data_hash=data_hash(files.stats), tune_run_id=tune_run))
    if summary:  # rank 0 (the others return nothing)
        print(json.dumps({k: summary[k] for k in ("best_epoch", f"best_{task.val_metric}", "epochs_run")}))
    return 0


def _data_args(p) -> None:
    """The preprocess stage's files a learning stage reads (the rules pass each one)."""
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
    _data_args(p)
    p.add_argument("--best-config", help="the tune stage's best_config.yaml")
    p.add_argument("--model", required=True, help="output: the trained model (model.pt)")
    p.add_argument("--history", required=True, help="output: one row per epoch (history.csv)")
    # not --run: torchrun (the re-launch over several GPUs) would take it for its --run-path
    p.add_argument("--summary", required=True, help="output: the run's summary (run.json)")
    p.add_argument("--workdir", help="holds checkpoints/ (last.pt, from which a killed run resumes; best.pt) "
                                     "(default: the folder of --model)")
    p.add_argument("--nproc", type=int, help="data-parallel processes under torchrun (default: config train.ddp; "
                                             "auto = one per visible GPU when there are several)")
    stage_args(p)
    p.set_defaults(func=cmd_train)

