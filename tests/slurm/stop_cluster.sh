#!/usr/bin/env bash
# Stop the test cluster that tests/slurm/start_cluster.sh started, and clean up after it.
#
#   tests/slurm/stop_cluster.sh [--keep-logs] [--remove-packages] [STATE_DIR]
#
# Stops exactly the processes whose PIDs start_cluster.sh recorded in STATE_DIR/pids (slurmd,
# slurmctld, munged if it started it), never anything found by name: each PID is checked to still
# be the recorded daemon (/proc/PID/exe) before it gets SIGTERM, then SIGKILL after 15 s. Jobs still
# in the test cluster are cancelled first (scancel of their job ids, through the test cluster's own
# /etc/slurm/slurm.conf), so no slurmstepd is left behind. Then the /etc/slurm/slurm.conf and
# gres.conf that start_cluster.sh wrote are removed (only if they still carry its marker line) and
# STATE_DIR is removed (--keep-logs keeps STATE_DIR/log for inspection).
#
# --remove-packages also purges the Debian packages that start_cluster.sh installed (the list in
# STATE_DIR/installed_packages; packages that were there before are never removed).
#
# Exit codes: 0 stopped (or nothing to stop), 2 usage, 3 not root, 8 a process did not stop.
set -uo pipefail

die() { local code=$1; shift; echo "stop_cluster.sh: $*" >&2; exit "$code"; }

KEEP_LOGS=0
REMOVE_PKGS=0
STATE=""
for arg in "$@"; do
    case "$arg" in
        --keep-logs) KEEP_LOGS=1 ;;
        --remove-packages) REMOVE_PKGS=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) die 2 "unknown option $arg" ;;
        *) [ -z "$STATE" ] || die 2 "usage: $0 [--keep-logs] [--remove-packages] [STATE_DIR]"; STATE=$arg ;;
    esac
done
STATE=${STATE:-${HETCOMP_SLURM_DIR:-/tmp/hetcomp-slurm}}
[ "$(id -u)" -eq 0 ] || die 3 "needs root (the daemons run as root or munge)"
[ -d "$STATE" ] || { echo "stop_cluster.sh: no state dir $STATE; nothing to stop"; exit 0; }

alive() { kill -0 "$1" 2>/dev/null; }
ctld_pid=$(awk '$1 == "slurmctld" {print $2}' "$STATE/pids" 2>/dev/null | head -n1)

# Cancel whatever is still queued or running in the test cluster (by job id).
if [ -n "$ctld_pid" ] && alive "$ctld_pid" && [ -f /etc/slurm/slurm.conf ]; then
    jobs=$(squeue -h -t PENDING,RUNNING,SUSPENDED,CONFIGURING -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        echo "stop_cluster.sh: cancelling jobs $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 30); do
            [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

status=0
stop_pid() {  # name pid exe starttime (as start_cluster.sh recorded them)
    local name=$1 pid=$2 exe=${3:-} start=${4:-} now_exe now_start
    alive "$pid" || { echo "stop_cluster.sh: $name (pid $pid) already gone"; return 0; }
    now_exe=$(readlink "/proc/$pid/exe" 2>/dev/null)
    now_start=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f20)
    if [ "$now_exe" != "$exe" ] || [ "$now_start" != "$start" ]; then
        echo "stop_cluster.sh: pid $pid is no longer the $name that start_cluster.sh started" \
             "($now_exe started at $now_start, recorded $exe at $start); left alone" >&2
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        echo "stop_cluster.sh: $name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null
        sleep 0.5
    fi
    if alive "$pid"; then
        echo "stop_cluster.sh: $name (pid $pid) still running" >&2
        status=8
    else
        echo "stop_cluster.sh: stopped $name (pid $pid)"
    fi
}

# Reverse start order: slurmd, slurmctld, munged.
if [ -f "$STATE/pids" ]; then
    mapfile -t entries < <(tac "$STATE/pids")
    for entry in "${entries[@]}"; do
        read -r name pid exe start <<< "$entry"
        [ -n "${pid:-}" ] && stop_pid "$name" "$pid" "${exe:-}" "${start:-}"
    done
fi

# The configuration files written by start_cluster.sh (never someone else's).
if [ "$status" -eq 0 ] && [ -f "$STATE/conf_files" ]; then
    while read -r conf; do
        [ -n "$conf" ] && [ -f "$conf" ] || continue
        if head -n1 "$conf" | grep -qF "# Written by tests/slurm/start_cluster.sh"; then
            rm -f "$conf" && echo "stop_cluster.sh: removed $conf"
        else
            echo "stop_cluster.sh: $conf was not written by start_cluster.sh; left alone" >&2
        fi
    done < "$STATE/conf_files"
fi

if [ "$REMOVE_PKGS" -eq 1 ] && [ -s "$STATE/installed_packages" ]; then
    pkgs=$(sort -u "$STATE/installed_packages" | tr '\n' ' ')
    echo "stop_cluster.sh: purging the packages start_cluster.sh installed: $pkgs"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -q $pkgs > "$STATE/apt-purge.log" 2>&1 \
        && rm -f "$STATE/installed_packages" \
        || { echo "stop_cluster.sh: apt-get purge failed; see $STATE/apt-purge.log" >&2; status=8; }
fi

if [ "$status" -eq 0 ]; then
    # Keep the record of installed packages (for a later --remove-packages) and, if asked, the logs.
    for entry in "$STATE"/* "$STATE"/.[!.]*; do
        [ -e "$entry" ] || continue
        case "$(basename "$entry")" in
            installed_packages) continue ;;
            log) [ "$KEEP_LOGS" -eq 1 ] && continue ;;
        esac
        rm -rf "$entry"
    done
    rmdir "$STATE" 2>/dev/null
    echo "stop_cluster.sh: cluster stopped and $STATE cleaned up"
fi
exit "$status"
