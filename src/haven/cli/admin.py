"""Set-up commands: keys, demo data, the Snakemake profiles and the site's Slurm values."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("haven")


def cmd_keygen(args) -> int:
    from haven.keys import create_key

    existed = Path(args.path).exists()
    create_key(args.path)
    print(f"key {'already present' if existed else 'written'} at {args.path} (keep it secret, outside results)")
    return 0


def cmd_demo(args) -> int:
    from haven import demo, demomri, demonew, demoretina

    makers = {"digits": demo.make_digits, "brain-ct": demo.make_brain_ct,
              "digits-new": demonew.make_digits_new, "brain-ct-new": demonew.make_brain_ct_new,
              "retinopathy": demoretina.make_retinopathy, "retinopathy-new": demoretina.make_retinopathy_new,
              "brain-mri": demomri.make_brain_mri, "brain-mri-new": demomri.make_brain_mri_new}
    summary = makers[args.name](Path(args.out), seed=args.seed)
    # counts only: the demo's details (sites, names) are the kind of PHI a log must not carry
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}))
    return 0


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


def add_commands(sub) -> None:
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
    p = sub.add_parser("demo", help="generate a demo dataset from packages (no download); *-new: held-back, "
                                    "unlabeled new patients for the predict DAG")
    p.add_argument("name", choices=["digits", "brain-ct", "digits-new", "brain-ct-new", "retinopathy",
                                    "retinopathy-new", "brain-mri", "brain-mri-new"])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

