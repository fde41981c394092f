#!/usr/bin/env bash
# Start a throw-away one-node SLURM cluster on this machine, for testing the SLURM profile.
#
#   tests/slurm/start_cluster.sh [STATE_DIR]
#
# The configuration goes to /etc/slurm/slurm.conf and /etc/slurm/gres.conf, where every SLURM command
# looks by default: SLURM_CONF cannot point elsewhere, because Snakemake's jobstep plugin removes all
# SLURM_* variables before its `srun` inside each job. An existing slurm.conf that this script did not
# write is never overwritten (exit 9). stop_cluster.sh removes both files again: a slurm.conf naming a
# controller that does not run makes every `snakemake` call on the machine about 9 s slower.
# STATE_DIR (default $HETCOMP_SLURM_DIR, else /tmp/hetcomp-slurm) receives everything else the cluster
# writes: spool/state/log folders and `pids` (one "name pid exe starttime" a line: exactly the daemons
# this script started; tests/slurm/stop_cluster.sh stops those and nothing else).
#
# Installs slurmctld slurmd slurm-client munge with apt (--no-install-recommends) when missing and
# records the packages it added in STATE_DIR/installed_packages (stop_cluster.sh --remove-packages
# purges exactly those). The node is this machine as `slurmd -C` sees it, with N fake GPUs
# (gres/gpu, N = $HETCOMP_SLURM_GPUS, default 2) backed by distinct existing device files, so that
# jobs requesting `--gpus=1` are accepted and scheduled; nothing on the node is a real GPU.
#
# Linux-only, no systemd or cgroups needed: proctrack/linuxproc, task/none, no accounting;
# MinJobAge=600 keeps finished jobs visible to `squeue`, which the test profile uses as its status
# command (no slurmdbd, so `sacct` knows no jobs).
#
# Exit codes (tests/test_slurm.py skips on any of 3-9 with the message, or fails when
# HETCOMP_SLURM_REQUIRED=1):
#   0 cluster up, node idle        3 not root
#   2 usage error                  4 no apt-get / not a Debian-like system
#   5 the packages cannot be installed (no network, no candidate)
#   6 a daemon did not start or the node did not become idle (see STATE_DIR/log/)
#   7 a test cluster (from STATE_DIR or another state dir) is still running (stop_cluster.sh first)
#   9 /etc/slurm/slurm.conf exists and was not written by this script (a real SLURM installation)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { local code=$1; shift; echo "start_cluster.sh: $*" >&2; exit "$code"; }

[ $# -le 1 ] || die 2 "usage: $0 [STATE_DIR]"
STATE=${1:-${HETCOMP_SLURM_DIR:-/tmp/hetcomp-slurm}}
NGPUS=${HETCOMP_SLURM_GPUS:-2}
PARTITION=${HETCOMP_SLURM_PARTITION:-debug}
WAIT_S=${HETCOMP_SLURM_WAIT_S:-60}
case "$NGPUS" in ''|*[!0-9]*) die 2 "HETCOMP_SLURM_GPUS must be a number, got '$NGPUS'";; esac
[ "$NGPUS" -le 8 ] || die 2 "at most 8 fake GPUs (one distinct device file each)"

[ "$(uname -s)" = Linux ] || die 4 "needs Linux"
[ "$(id -u)" -eq 0 ] || die 3 "needs root (installs packages, starts munged/slurmctld/slurmd); running as $(id -un)"
command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 \
    || die 4 "needs apt-get and dpkg (Debian/Ubuntu); not found"

# A previous cluster from this state dir that is still alive?
if [ -f "$STATE/pids" ]; then
    while read -r name pid _; do
        [ -n "${pid:-}" ] && kill -0 "$pid" 2>/dev/null \
            && die 7 "$name (pid $pid) from $STATE is still running; run tests/slurm/stop_cluster.sh $STATE first"
    done < "$STATE/pids"
fi

# ---------------------------------------------------------------- packages
PKGS=(slurmctld slurmd slurm-client munge)
need_install=0
for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/squeue /usr/sbin/munged /usr/bin/munge; do
    [ -x "$bin" ] || need_install=1
done
mkdir -p "$STATE" && STATE=$(cd "$STATE" && pwd) || die 6 "cannot create $STATE"
case "$STATE" in *[\|\ ]*) die 2 "STATE_DIR must not contain spaces or '|': $STATE";; esac
if [ "$need_install" -eq 1 ]; then
    echo "start_cluster.sh: installing ${PKGS[*]} (apt-get, --no-install-recommends) ..."
    dpkg-query -W -f='${Package}\n' | sort > "$STATE/.pkgs_before"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show slurmctld >/dev/null 2>&1; then
        apt-get update -q > "$STATE/apt-update.log" 2>&1 \
            || die 5 "apt-get update failed (no network or repository?); see $STATE/apt-update.log"
    fi
    # "policy-rc.d denied execution of start" is expected here: the daemons are started by hand below.
    if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" > "$STATE/apt-install.log" 2>&1; then
        # The package lists may be stale: refresh once and retry.
        apt-get update -q > "$STATE/apt-update.log" 2>&1 \
            || die 5 "apt-get update failed (no network or repository?); see $STATE/apt-update.log"
        apt-get install -y -q --no-install-recommends "${PKGS[@]}" > "$STATE/apt-install.log" 2>&1 \
            || die 5 "apt-get install ${PKGS[*]} failed; see $STATE/apt-install.log"
    fi
    dpkg-query -W -f='${Package}\n' | sort > "$STATE/.pkgs_after"
    comm -13 "$STATE/.pkgs_before" "$STATE/.pkgs_after" >> "$STATE/installed_packages"
    rm -f "$STATE/.pkgs_before" "$STATE/.pkgs_after"
fi
for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/squeue /usr/sbin/munged; do
    [ -x "$bin" ] || die 5 "$bin missing after installation"
done

# ---------------------------------------------------------------- configuration
CONF_DIR=/etc/slurm
MARKER="# Written by tests/slurm/start_cluster.sh"
if [ -e "$CONF_DIR/slurm.conf" ] && ! head -n1 "$CONF_DIR/slurm.conf" | grep -qF "$MARKER"; then
    die 9 "$CONF_DIR/slurm.conf exists and was not written by this script; refusing to replace it"
fi
if [ -e "$CONF_DIR/gres.conf" ] && ! head -n1 "$CONF_DIR/gres.conf" | grep -qF "$MARKER"; then
    die 9 "$CONF_DIR/gres.conf exists and was not written by this script; refusing to replace it"
fi
if [ -e "$CONF_DIR/slurm.conf" ]; then
    # Ours, from an earlier start: refuse while that cluster still runs, else replace it.
    other=$(sed -n 's/.*(state in \([^)]*\)).*/\1/p' "$CONF_DIR/slurm.conf" | head -n1)
    if [ -n "$other" ] && [ -f "$other/pids" ]; then
        while read -r name pid _; do
            [ -n "${pid:-}" ] && kill -0 "$pid" 2>/dev/null \
                && die 7 "a test cluster from $other is running ($name pid $pid); run tests/slurm/stop_cluster.sh $other first"
        done < "$other/pids"
    fi
fi
mkdir -p "$CONF_DIR"
HOST=$(hostname -s)
rm -rf "$STATE/spool" "$STATE/state" "$STATE/log"
mkdir -p "$STATE/spool" "$STATE/state" "$STATE/log"
: > "$STATE/pids"

NODE_LINE=$(/usr/sbin/slurmd -C 2>/dev/null | head -n1)
case "$NODE_LINE" in NodeName=*) ;; *) die 6 "'slurmd -C' printed no node line: '$NODE_LINE'";; esac
GRES_NODE=""
DEVICES=(/dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty /dev/ptmx /dev/console)
echo "$MARKER for the test cluster of $STATE; removed by stop_cluster.sh" > "$CONF_DIR/gres.conf"
echo "$CONF_DIR/gres.conf" > "$STATE/conf_files"
if [ "$NGPUS" -gt 0 ]; then
    GRES_NODE=" Gres=gpu:$NGPUS"
    # One line per fake GPU, each with a DIFFERENT existing device file: slurmd exits on a repeated
    # file, and a file-less Count=N registers no GPU at all.
    for ((i = 0; i < NGPUS; i++)); do
        [ -e "${DEVICES[$i]}" ] || die 6 "device file ${DEVICES[$i]} missing (needed for fake GPU $i)"
        echo "NodeName=$HOST Name=gpu File=${DEVICES[$i]}" >> "$CONF_DIR/gres.conf"
    done
fi

sed -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@PARTITION@|$PARTITION|g" \
    -e "s|@CTLD_PORT@|${HETCOMP_SLURMCTLD_PORT:-6817}|g" -e "s|@SLURMD_PORT@|${HETCOMP_SLURMD_PORT:-6818}|g" \
    -e "s|@NODE_LINE@|$NODE_LINE$GRES_NODE|g" "$HERE/slurm.conf.in" > "$CONF_DIR/slurm.conf" \
    || die 6 "cannot write $CONF_DIR/slurm.conf from $HERE/slurm.conf.in"
echo "$CONF_DIR/slurm.conf" >> "$STATE/conf_files"
unset SLURM_CONF

# "name pid exe starttime": stop_cluster.sh signals a PID only while it is still this process.
record_pid() {  # name pid
    local exe start
    exe=$(readlink "/proc/$2/exe" 2>/dev/null)
    start=$(sed 's/.*) //' "/proc/$2/stat" 2>/dev/null | cut -d' ' -f20)
    echo "$1 $2 ${exe:-?} ${start:-?}" >> "$STATE/pids"
}

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
    echo "start_cluster.sh: munged already running (not started here, will not be stopped)"
else
    [ -f /etc/munge/munge.key ] || die 6 "/etc/munge/munge.key missing (the munge package creates it)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid \
        > "$STATE/log/munged.out" 2>&1 || die 6 "munged did not start; see $STATE/log/munged.out"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die 6 "munge -n | unmunge fails after starting munged"
    pid=$(cat /run/munge/munged.pid 2>/dev/null)
    [ -n "$pid" ] && record_pid munged "$pid"
fi

# ---------------------------------------------------------------- slurmctld, slurmd
start_daemon() {  # name binary
    local name=$1 bin=$2 pid=""
    "$bin" -f "$CONF_DIR/slurm.conf" > "$STATE/log/$name.out" 2>&1 \
        || die 6 "$name did not start; see $STATE/log/$name.out and $STATE/log/$name.log"
    for _ in $(seq 100); do
        pid=$(cat "$STATE/$name.pid" 2>/dev/null) && [ -n "$pid" ] && break
        sleep 0.1
    done
    [ -n "$pid" ] || die 6 "$name wrote no pid file; see $STATE/log/$name.log"
    record_pid "$name" "$pid"
    sleep 0.5
    kill -0 "$pid" 2>/dev/null || die 6 "$name (pid $pid) exited; see $STATE/log/$name.log"
}
start_daemon slurmctld /usr/sbin/slurmctld
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
start_daemon slurmd /usr/sbin/slurmd

state=""
for _ in $(seq "$((WAIT_S * 2))"); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n1)
    [ "$state" = idle ] && break
    sleep 0.5
done
[ "$state" = idle ] || die 6 "node state is '${state:-unknown}' after ${WAIT_S}s, not idle; see $STATE/log/"
gpus=$(scontrol show node "$HOST" 2>/dev/null | sed -n 's/.*Gres=\([^ ]*\).*/\1/p' | head -n1)
echo "start_cluster.sh: cluster up; node $HOST idle, partition $PARTITION, gres ${gpus:-none}"
