"""HPO efficiency: the trial-epochs ASHA needs to reach a validation-accuracy target on the digits
project, against random search with the full budget per trial; same seeds, same space, same
sampled configurations (both arms draw them with Ray's seeded random search, and a seeded trial
trains deterministically, so a configuration's curve is the same in both arms).

Both arms run one trial at a time on all the CPUs, so the order in which trial-epochs are spent
is the order in which the configurations were drawn and no count depends on timing.

* search budget (the headline): each arm's whole search of ``--samples`` configurations; ASHA's
  cost is the trial-epochs it spent (measured), random search's is samples x max_epochs (every
  trial runs the full budget: that is the arm).  Both searches must reach the target (their best
  val_accuracy >= target: measured for ASHA; for random search by its run below).
      ratio = ASHA's trial-epochs / (samples x max_epochs)
* first hit (anytime): trial-epochs until the first epoch with val_accuracy >= target, in the
  order they were spent: ASHA from its search's history; random search by a run that stops at
  the target.  This one depends on the luck of the draw: when the first configuration is a good
  one, no scheduler can save anything.

Both are summed over the seeds (and given per seed).  The issue's target is ratio <= 1/3.

The data are the digits project's audited images (``results/digits/anonymize``, made by the
pipeline), preprocessed again at ``--size`` pixels into a scratch folder so that the benchmark
finishes on a laptop CPU; the model and the train settings are the project's, except that
augmentation is off and the backbone is trained from the first epoch (``--augment``,
``--freeze-epochs 1`` restore the project's).  The space is the digits project's search space
widened to what one would search without prior knowledge (``--space config`` uses the project's
own).  ASHA: grace period 1 epoch, reduction factor 3, max_t = the full budget.

    python benchmarks/hpo_efficiency.py                       # 3 seeds, 12 trials of 6 epochs
    python benchmarks/hpo_efficiency.py --seeds 0 --samples 8 --size 16   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the digits space widened: learning rates over four decades, how much of the backbone to train
WIDE_SPACE = {
    "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
    "backbone_lr_factor": {"type": "choice", "values": [0.01, 0.1, 1.0]},
    "batch_size": {"type": "choice", "values": [32, 64, 128]},
    "unfreeze": {"type": "choice", "values": ["all", 1, 3]},
    "weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-1},
}


class TargetReached:
    """Tune stopper: end the whole search once any trial reaches the target."""

    def __init__(self, metric: str, target: float):
        from ray.tune import Stopper

        class _Stop(Stopper):
            def __init__(self):
                self.reached = False

            def __call__(self, trial_id, result):
                self.reached = self.reached or result.get(metric, -1) >= target
                return False

            def stop_all(self):
                return self.reached

        self.stopper = _Stop()


def prepare_data(results: Path, project: str, size: int, scratch: Path, conf: dict) -> Path:
    """The project's audited data, preprocessed at ``size`` px (reused when it exists)."""
    from haven.learn.preprocess import preprocess

    pre_cfg = dict(conf["projects"][project]["preprocess"], size=size)
    own = results / project / "preprocess"
    if pre_cfg == conf["projects"][project]["preprocess"] and (own / "stats.json").is_file():
        return own
    out = scratch / f"{project}-{size}px" / "preprocess"
    if (out / "stats.json").is_file():
        return out
    anon = results / project / "anonymize"
    if not (anon / "audit.json").is_file():
        raise SystemExit(f"{anon}/audit.json missing: run the pipeline first (snakemake --profile profiles/local "
                         f"{results}/{project}/preprocess/stats.json)")
    preprocess(anon, out, pre_cfg, seed=conf["seed"], task=conf["projects"][project]["task"])
    return out


def run_arm(pre: Path, storage: Path, conf: dict, project: str, args, scheduler: str, seed: int,
            stop_at_target: bool) -> dict:
    """One search; returns its cost figures and its trials."""
    from haven.learn.launch import allocated_cpus
    from haven.learn.tasks import get_task
    from haven.learn.tune import run_search, trial_tables

    p = conf["projects"][project]
    train_cfg = dict(p["train"], freeze_epochs=args.freeze_epochs)
    if not args.augment:  # the scheduler comparison needs no augmentation (and runs faster without)
        train_cfg.update(augment={}, augment_strength=0.0)
    tune_cfg = dict(p["tune"], num_samples=args.samples, max_epochs=args.max_epochs, scheduler=scheduler,
                    search="random", grace_period=1, reduction_factor=args.reduction_factor,
                    metric="val_accuracy", mode="max", cpus_per_trial=allocated_cpus(), gpus_per_trial=0,
                    max_concurrent_trials=1, max_failures=0, keep_checkpoints=False,
                    search_space=WIDE_SPACE if args.space == "wide" else p["tune"]["search_space"])
    stop = TargetReached("val_accuracy", args.target).stopper if stop_at_target else None
    t0 = time.perf_counter()
    grid, _ = run_search(pre / "train.zarr", pre / "val.zarr", pre / "stats.json", p["model"], train_cfg, tune_cfg,
                         task=get_task(p["task"]), seed=seed, stopper=stop, fresh=True,
                         storage=storage / f"{scheduler}-{seed}")
    wall = time.perf_counter() - t0
    trials, history = trial_tables(grid, "val_accuracy", "max")
    hit = history.index[history["val_accuracy"] >= args.target]
    params = [c for c in trials.columns if c.startswith("param_")]
    order = trials.sort_values("trial_id")  # Ray's trial ids follow the draw order
    return {"scheduler": scheduler, "seed": seed, "reached": len(hit) > 0,
            "first_hit_trial_epochs": int(history.loc[hit[0], "trial_epochs"]) if len(hit) else None,
            "trial_epochs_spent": int(len(history)), "trials_started": int(len(trials)),
            "best_val_accuracy": float(history["val_accuracy"].max()), "seconds": round(wall, 1),
            "epochs_per_trial": order["training_iteration"].tolist(),
            "configs": order[params].astype(str).to_dict("records")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--project", default="digits")
    ap.add_argument("--size", type=int, default=32, help="image size of the benchmark's preprocessing")
    ap.add_argument("--target", type=float, default=0.8, help="validation accuracy to reach")
    ap.add_argument("--augment", action="store_true", help="keep the project's augmentation (off by default)")
    ap.add_argument("--freeze-epochs", type=int, default=0,
                    help="head-only epochs first (the project has 1; at 32 px a head-only epoch leaves every "
                         "configuration at chance accuracy, so ASHA's first rung could not rank them)")
    ap.add_argument("--samples", type=int, default=12, help="trials (configurations) per search")
    ap.add_argument("--max-epochs", type=int, default=6, help="full budget per trial (ASHA's max_t)")
    ap.add_argument("--reduction-factor", type=float, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--space", choices=["wide", "config"], default="wide")
    ap.add_argument("--scratch", help="work folder (default: <results>/benchmarks/hpo_efficiency)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("distributed", "ray", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from haven import config as cfg

    conf = cfg.load(args.config)
    results = Path(conf["results"])
    if not results.is_absolute():
        results = Path(args.config).resolve().parent / results
    scratch = Path(args.scratch) if args.scratch else results / "benchmarks" / "hpo_efficiency"
    pre = prepare_data(results, args.project, args.size, scratch, conf)
    print(f"data: {pre}  target val_accuracy >= {args.target}  {args.samples} trials x {args.max_epochs} epochs, "
          f"ASHA grace 1 / reduction {args.reduction_factor:g}, freeze_epochs {args.freeze_epochs}, "
          f"augmentation {'on' if args.augment else 'off'}, space: {args.space}, seeds {args.seeds}", flush=True)

    budget = args.samples * args.max_epochs
    rows, per_seed = [], []
    for seed in args.seeds:
        asha = run_arm(pre, scratch / "ray", conf, args.project, args, "asha", seed, stop_at_target=False)
        rand = run_arm(pre, scratch / "ray", conf, args.project, args, "fifo", seed, stop_at_target=True)
        n = len(rand["configs"])
        same = asha["configs"][:n] == rand["configs"]
        rows += [asha, rand]
        per_seed.append({"seed": seed, "asha_search": asha["trial_epochs_spent"], "random_search": budget,
                         "asha_reached": asha["reached"], "random_reached": rand["reached"],
                         "asha_first_hit": asha["first_hit_trial_epochs"],
                         "random_first_hit": rand["first_hit_trial_epochs"], "same_configs": same})
        print(f"seed {seed}: ASHA search {asha['trial_epochs_spent']} trial-epochs (best "
              f"{asha['best_val_accuracy']:.3f}, epochs/trial {asha['epochs_per_trial']}, {asha['seconds']:.0f} s) "
              f"vs random search {budget}; first hit: ASHA {asha['first_hit_trial_epochs']} vs random "
              f"{rand['first_hit_trial_epochs']} (random ran {rand['trials_started']} trial(s) to its first hit, "
              f"epochs/trial {rand['epochs_per_trial']}, {rand['seconds']:.0f} s); same configurations: {same}",
              flush=True)
    asha_total = sum(r["asha_search"] for r in per_seed)
    random_total = budget * len(per_seed)
    hits = [r for r in per_seed if r["asha_first_hit"] and r["random_first_hit"]]
    summary = {"target_val_accuracy": args.target, "samples": args.samples, "max_epochs": args.max_epochs,
               "reduction_factor": args.reduction_factor, "grace_period": 1, "size": args.size,
               "space": args.space, "freeze_epochs": args.freeze_epochs, "augment": args.augment,
               "seeds": args.seeds, "asha_search_trial_epochs": asha_total,
               "random_search_trial_epochs": random_total, "ratio": asha_total / random_total,
               "all_reached": all(r["asha_reached"] and r["random_reached"] for r in per_seed),
               "first_hit_asha": sum(r["asha_first_hit"] for r in hits),
               "first_hit_random": sum(r["random_first_hit"] for r in hits),
               "per_seed": per_seed, "runs": rows}
    summary["first_hit_ratio"] = (summary["first_hit_asha"] / summary["first_hit_random"]) if hits else None
    print(f"\nsearch budget to reach val_accuracy >= {args.target}: ASHA {asha_total} vs random search "
          f"{random_total} trial-epochs: ratio {summary['ratio']:.3f} (target <= 0.333: "
          f"{'met' if summary['ratio'] <= 1 / 3 else 'NOT met'}"
          f"{'' if summary['all_reached'] else '; NOT every search reached the target'})")
    if hits:
        print(f"first hit: ASHA {summary['first_hit_asha']} vs random {summary['first_hit_random']} trial-epochs: "
              f"ratio {summary['first_hit_ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(scratch / "ray", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
