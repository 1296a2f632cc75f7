"""Starting the learning stages on what the job was given: the CPUs and GPUs of this job, the
torchrun re-launch of ``haven train`` over several GPUs, and Ray on every node of a multi-node
Slurm job for ``haven tune``.  The CLI handlers only ask these functions whether to re-launch.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# resources
def allocated_cpus(requested: int | None = None) -> int:
    """CPUs this job may use: the smallest of what was requested (the rule's threads), Slurm's
    allocation (``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE``) and the CPU affinity."""
    counts = [len(os.sched_getaffinity(0))]
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(var, "").isdigit():
            counts.append(int(os.environ[var]))
            break
    if requested:
        counts.append(int(requested))
    return max(1, min(counts))


def allocated_gpus() -> int:
    """GPUs this job may use: those in ``CUDA_VISIBLE_DEVICES`` (set by Slurm for the GPUs it
    allocated), else every GPU torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


# ---------------------------------------------------------------------------------------------
# train: data parallel under torchrun
def train_processes(nproc: int | None, train_cfg: dict) -> int:
    """Data-parallel processes: ``nproc`` (--nproc), else train.ddp (auto: one per visible GPU when several)."""
    if nproc:
        return nproc
    from haven.learn.train import hparams

    ddp = hparams(train_cfg)["ddp"]  # by hand, a train section may leave ddp out: the schema's default
    if ddp == "off":
        return 1
    if isinstance(ddp, int):
        return ddp
    return max(1, allocated_gpus())


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The same ``haven`` command once per process under torchrun (one node; rank 0 writes).
    torchrun reads the options after the script too, abbreviations included: an option of
    ``haven train`` must not be the start of one of torchrun's (hence ``--summary``, not ``--run``)."""
    argv = list(argv)
    if "--nproc" in argv:  # the ranks need no --nproc (and torchrun would take it for its own)
        at = argv.index("--nproc")
        del argv[at:at + 2]
    argv = [a for a in argv if not a.startswith("--nproc=")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "haven.cli", *argv]


def relaunch_train(argv: list[str], nproc: int | None, train_cfg: dict) -> int | None:
    """Run ``haven train`` (``argv``) as several data-parallel processes when it should be; returns
    their exit status, or None when this process is to train itself (one process, or a rank)."""
    if "LOCAL_RANK" in os.environ:  # a rank started by torchrun
        return None
    n = train_processes(nproc, train_cfg)
    if n <= 1:
        return None
    log.info("train: %d data-parallel processes (torchrun)", n)
    return subprocess.call(torchrun_command(argv, n))


# ---------------------------------------------------------------------------------------------
# tune: Ray on every node of a multi-node Slurm job
def slurm_multinode_command(argv: list[str], env: dict | None = None, port: int | None = None) -> list[str] | None:
    """The command that runs this tune stage on every node of a multi-node Slurm job, or None.

    Like Ray's Slurm guide: one task per node (``srun --ntasks-per-node=1``, ``--overlap`` so
    it runs beside the job step Snakemake's jobstep executor already holds), each running
    ``ray symmetric-run``: the node whose address is ``--address`` becomes the Ray head and runs
    ``haven tune ... --ray-address HEAD``, the others join as workers until it ends.  Each
    node's Ray gets the CPUs Slurm gave the task (``--num-cpus``) and the GPUs of its
    ``CUDA_VISIBLE_DEVICES``.  The trials' checkpoints and the search state live in the
    stage's ``ray`` folder under ``results``, which must be on the shared filesystem.
    """
    env = dict(os.environ if env is None else env)
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if nodes <= 1 or env.get("HAVEN_RAY_CLUSTER"):
        return None
    head_ip = socket.gethostbyname(socket.gethostname())
    port = port or 6379 + int(env.get("SLURM_JOB_ID", "0") or 0) % 1000
    address = f"{head_ip}:{port}"
    cmd = ["srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1"]
    if env.get("SLURM_JOB_NODELIST"):
        cmd.append(f"--nodelist={env['SLURM_JOB_NODELIST']}")
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if cpus:
        cmd.append(f"--cpus-per-task={cpus}")
    cmd += ["ray", "symmetric-run", "--address", address, "--min-nodes", str(nodes)]
    if cpus:
        cmd.append(f"--num-cpus={cpus}")
    cmd += ["--", "env", "HAVEN_RAY_CLUSTER=1", sys.executable, "-m", "haven.cli", *argv, "--ray-address", address]
    return cmd


def relaunch_tune(argv: list[str]) -> int | None:
    """In a Slurm job over several nodes, run ``haven tune`` (``argv``) with Ray on every node
    (ray symmetric-run, this command on the head); returns its exit status, or None to search here."""
    multi = slurm_multinode_command(argv)
    if not multi:
        return None
    log.info("multi-node Slurm job: %s", " ".join(multi))
    return subprocess.run(multi).returncode
