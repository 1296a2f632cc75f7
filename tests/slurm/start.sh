#!/usr/bin/env bash
# Bring up a private one-node Slurm cluster on this machine (as root, no systemd): its own
# munged, slurmctld and slurmd, every file (config, state, logs, pid files, munge key and socket)
# under one folder, so several can coexist and stop.sh stops exactly what this started.
#
#   tests/slurm/start.sh [DIR]          DIR: $HAVEN_SLURM_DIR, else /tmp/haven-slurm
#   export SLURM_CONF=DIR/slurm.conf PATH=DIR/bin:$PATH   sinfo, sbatch, squeue, ... use it
#   tests/slurm/stop.sh [DIR]
#
# Knobs (environment): HAVEN_SLURM_GPUS  fake GPUs on the node (GRES gpu, default 1; 0: none)
#                      HAVEN_SLURM_PARTITION  the (default) partition's name (default "haven")
#                      HAVEN_SLURMCTLD_PORT / HAVEN_SLURMD_PORT  (default 6817 / 6818)
# The node is this host's short hostname at 127.0.0.1 with the CPUs and memory `slurmd -C`
# reports.  No accounting storage (job status: squeue; finished jobs stay visible to squeue and
# scontrol for MinJobAge = 1 h); every finished job is also appended to DIR/jobcomp.txt.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin

DIR=${1:-${HAVEN_SLURM_DIR:-/tmp/haven-slurm}}
GPUS=${HAVEN_SLURM_GPUS:-1}
PARTITION=${HAVEN_SLURM_PARTITION:-haven}
CTLD_PORT=${HAVEN_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${HAVEN_SLURMD_PORT:-6818}
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "slurm start: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"
for b in munged munge unmunge slurmctld slurmd sinfo scontrol; do
  command -v "$b" >/dev/null || die "$b not found: install Slurm and MUNGE (.ci/system-setup)"
done

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
"$HERE/stop.sh" "$DIR" >/dev/null 2>&1 || true   # leftovers of an earlier start in DIR
rm -rf "$DIR/state" "$DIR/spool" "$DIR/munge" "$DIR"/*.log "$DIR/jobcomp.txt"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
chmod 755 "$DIR"

# ---- munge: a private daemon with its own key and socket ---------------------------------------
KEY=$DIR/munge/munge.key
if command -v mungekey >/dev/null; then mungekey --create --keyfile="$KEY" --force
else dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none; fi
chmod 400 "$KEY"
SOCK=$DIR/munge/munge.socket
munged --force --key-file="$KEY" --socket="$SOCK" --pid-file="$DIR/munge/munged.pid" \
       --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
for _ in $(seq 50); do (munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null) 2>/dev/null && break; sleep 0.1; done
(munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null) || die "munged does not answer on $SOCK"

# ---- slurm.conf and gres.conf (Slurm reads gres.conf from slurm.conf's folder) -----------------
HOST=$(hostname -s)
NODE=$(slurmd -C | head -1 | sed -e "s/^NodeName=[^ ]*/NodeName=$HOST NodeAddr=127.0.0.1/" -e 's/ *$//')
GRES_TYPES="" NODE_GRES=""
: > "$DIR/gres.conf"
if [ "$GPUS" -gt 0 ]; then
  # Fake GPUs: slurmd drops GPUs without a device file, so each gets a stand-in device node
  # (char 1:3, what /dev/null is) in DIR/dev; no autodetection.  Slurm schedules and binds
  # them like real ones (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE): `--gpus=N` works end to end.
  GRES_TYPES="GresTypes=gpu" NODE_GRES=" Gres=gpu:$GPUS"
  mkdir -p "$DIR/dev"
  files=()
  for i in $(seq 0 $((GPUS - 1))); do
    [ -c "$DIR/dev/fakegpu$i" ] || mknod -m 666 "$DIR/dev/fakegpu$i" c 1 3
    files+=("$DIR/dev/fakegpu$i")
  done
  { echo "AutoDetect=off"; echo "NodeName=$HOST Name=gpu Count=$GPUS File=$(IFS=,; echo "${files[*]}")"; } > "$DIR/gres.conf"
fi
sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@MUNGE_SOCKET@|$SOCK|g" -e "s|@GRES_TYPES@|$GRES_TYPES|" \
    -e "s|@NODE@|$NODE$NODE_GRES State=UNKNOWN|" -e "s|@PARTITION@|$PARTITION|g" \
    "$HERE/slurm.conf.in" > "$DIR/slurm.conf"
export SLURM_CONF=$DIR/slurm.conf

# ---- DIR/bin/srun: srun that finds this cluster even without SLURM_CONF ------------------------
# Inside a job, snakemake-executor-plugin-slurm-jobstep (0.6) starts the rule with `srun` and
# strips SLURM_* from that srun's environment, SLURM_CONF included (plugin issue #164), so srun
# finds no configuration unless it is at /etc/slurm/slurm.conf.  A real cluster keeps it there;
# this private one does not, so jobs see this wrapper first on PATH (the test puts DIR/bin there
# and sbatch --export=ALL passes PATH on).
mkdir -p "$DIR/bin"
cat > "$DIR/bin/srun" <<WRAP
#!/bin/sh
export SLURM_CONF=\${SLURM_CONF:-$SLURM_CONF}
exec $(command -v srun) "\$@"
WRAP
chmod 755 "$DIR/bin/srun"

# ---- slurmctld, slurmd -------------------------------------------------------------------------
slurmctld -f "$SLURM_CONF" -i          # -i: ignore (there is no) saved state
slurmd -f "$SLURM_CONF"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
state="" deadline=$((SECONDS + 90))
while [ $SECONDS -lt $deadline ]; do
  state=$(timeout 5 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)
  [ "$state" = idle ] && break
  sleep 0.5
  alive "$DIR/slurmctld.pid" || { state="slurmctld exited"; break; }
  alive "$DIR/slurmd.pid" || { state="slurmd exited"; break; }
done
if [ "$state" != idle ]; then
  echo "node state: '$state'" >&2
  scontrol show node "$HOST" >&2 || true
  tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
  die "node $HOST did not become idle"
fi
echo "slurm is up: node=$HOST partition=$PARTITION gpus=$GPUS; use it with"
echo "  export SLURM_CONF=$SLURM_CONF PATH=$DIR/bin:\$PATH"
