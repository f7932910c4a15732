# shellcheck shell=bash
# common.sh: what both provisioning scripts share. A VM runs them as root with systemd as PID 1;
# tests/test_vagrant.py runs the very same scripts inside the netns lab's node namespaces, where
# systemd is not PID 1 and each "VM" installs below its own NODEMESH_ROOT (one machine, one /opt).
set -euo pipefail

ROOT=${NODEMESH_ROOT:-}                # "" on a VM: install into / as the install scripts do
log() { printf '[provision %s] %s\n' "$(hostname -s 2>/dev/null || echo vm)" "$*" >&2; }
die() { printf '[provision] ERROR: %s\n' "$*" >&2; exit 1; }

systemd_here() { [[ -z $ROOT && -d /run/systemd/system ]]; }

root_args() { [[ -n $ROOT ]] && printf '%s\n' --root "$ROOT" || true; }

# start_background NAME CMD...: what systemd does for the unit on a VM, when it is not there:
# run CMD detached, log to $ROOT/var/log/NAME.log, pid in $ROOT/run/NAME.pid. Idempotent.
start_background() {
    local name=$1
    shift
    local pidf="$ROOT/run/$name.pid" logf="$ROOT/var/log/$name.log"
    mkdir -p "$(dirname "$pidf")" "$(dirname "$logf")"
    if [[ -f $pidf ]] && kill -0 "$(<"$pidf")" 2>/dev/null; then
        log "$name already runs (pid $(<"$pidf"))"
        return 0
    fi
    setsid "$@" >>"$logf" 2>&1 < /dev/null &
    echo $! >"$pidf"
    log "started $name without systemd (pid $!, log $logf)"
}

# wait_for WHAT SECONDS CMD...: retry CMD until it succeeds, or fail naming WHAT.
wait_for() {
    local what=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what not ready after ${limit}s"
        sleep 0.5
    done
}
