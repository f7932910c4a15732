# shellcheck shell=bash
# nodemesh machine set-up, sourced by scripts/test and scripts/lab (not run directly).
#
# nodemesh_setup installs whatever is missing on a Debian 12 machine and is a no-op (well
# under a second) when everything is already in place:
#   1. Debian packages (bcc, kernel headers, iproute2, iptables, nftables, bpftool, ...)
#   2. a merged kernel-header tree for bcc at /var/lib/nodemesh/kheaders (see KERNEL-NOTES)
#   3. the project venv .venv (Python >= 3.11) with `pip install -e '.[test]'`
#   4. Debian's bcc linked into the venv (the PyPI package called "bcc" is unrelated)
#   5. BCC_KERNEL_SOURCE exported for whatever runs next
# Progress and errors go to stderr, prefixed with "[setup]".

set -euo pipefail

NODEMESH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
NODEMESH_STATE=/var/lib/nodemesh
NODEMESH_KHEADERS="$NODEMESH_STATE/kheaders"
NODEMESH_VENV="$NODEMESH_ROOT/.venv"

NODEMESH_APT_PACKAGES=(
    python3-bpfcc
    "linux-headers-$(dpkg --print-architecture 2>/dev/null || echo amd64)"
    iproute2 iptables nftables python3-nftables bpftool
    procps psmisc ca-certificates curl kmod util-linux wrk
    ruby      # `ruby -c` and the stand-in for Vagrant's DSL that check vagrant/Vagrantfile (tests/test_vagrant.py)
    systemd   # systemd-analyze verify checks the units `nodemesh install systemd` prints
)

# The scripts that source this one (scripts/install-*) set their own tag for these lines.
NM_LOG_TAG=${NM_LOG_TAG:-setup}
nm_log() { printf '[%s] %s\n' "$NM_LOG_TAG" "$*" >&2; }
nm_die() {
    printf '[%s] ERROR: %s\n' "$NM_LOG_TAG" "$1" >&2
    shift
    local hint
    for hint in "$@"; do printf '[%s]   -> %s\n' "$NM_LOG_TAG" "$hint" >&2; done
    exit 1
}

# Unexpected failures (set -e) name the command and the line instead of exiting silently.
nm__on_err() {
    local rc=$1 where=$2 cmd=$3
    printf '[%s] ERROR: command failed (exit %s) at %s: %s\n' "$NM_LOG_TAG" "$rc" "$where" "$cmd" >&2
    printf '[%s]   -> fix the cause above and re-run; it resumes where it stopped\n' "$NM_LOG_TAG" >&2
}

nm_require_root() {
    if [[ $EUID -ne 0 ]]; then
        nm_die "$(basename "$0") needs root (it installs Debian packages and uses network namespaces and eBPF)" \
            "run it with sudo:  sudo $0${*:+ $*}"
    fi
}

# --- 1. Debian packages ---------------------------------------------------------------------

# Prints the given packages that are not fully installed, one per line.
nm__missing_packages() {
    local -A ok=()
    local name status
    while IFS=$'\t' read -r name status; do
        [[ $status == "install ok installed" ]] && ok[$name]=1
    done < <(dpkg-query -W -f='${Package}\t${Status}\n' "$@" 2>/dev/null || true)
    for name in "$@"; do
        [[ -n ${ok[$name]:-} ]] || printf '%s\n' "$name"
    done
}

nm__apt_updated=
nm_apt_install() {
    local missing
    mapfile -t missing < <(nm__missing_packages "$@")
    ((${#missing[@]})) || return 0
    nm_log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local apt_opts=(-q -o DPkg::Lock::Timeout=600)
    if [[ -z $nm__apt_updated ]]; then
        # A broken third-party source makes `apt-get update` fail; try the install anyway.
        if ! apt-get "${apt_opts[@]}" update >/tmp/nodemesh-apt-update.log 2>&1; then
            nm_log "warning: apt-get update reported errors (log: /tmp/nodemesh-apt-update.log); trying the install anyway"
        fi
        nm__apt_updated=1
    fi
    if ! apt-get "${apt_opts[@]}" install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/tmp/nodemesh-apt-install.log 2>&1; then
        tail -n 25 /tmp/nodemesh-apt-install.log >&2
        nm_die "apt-get install failed for: ${missing[*]} (full log: /tmp/nodemesh-apt-install.log)" \
            "check that Debian 12 (bookworm) main is in /etc/apt/sources.list(.d) and reachable" \
            "then run: sudo apt-get update && sudo apt-get install --no-install-recommends ${missing[*]}"
    fi
}

# --- 2. kernel headers for bcc --------------------------------------------------------------

# Debian splits a kernel's headers into linux-headers-<abi>-common and linux-headers-<abi>-<flavour>;
# bcc wants one tree. Rebuilt only when missing or when the header package version changed.
nm_kheaders() {
    local arch flavour karch meta ver build common stamp
    arch=$(dpkg --print-architecture)
    case $arch in
        amd64) flavour=amd64 karch=x86 ;;
        arm64) flavour=arm64 karch=arm64 ;;
        *) nm_die "no kernel-header recipe for architecture $arch" "only amd64 and arm64 are supported" ;;
    esac
    meta="linux-headers-$arch"
    ver=$(dpkg-query -W -f='${Version}' "$meta" 2>/dev/null) ||
        nm_die "$meta is not installed" "run: sudo apt-get install --no-install-recommends $meta"

    # The meta package depends on exactly one linux-headers-<abi>-<flavour>.
    build=$(dpkg-query -W -f='${Depends}' "$meta" | tr ',' '\n' |
        sed -n "s/^ *\(linux-headers-[0-9][^ ]*-$flavour\).*/\1/p" | head -n1)
    [[ -n $build ]] || build=$(basename "$(ls -d /usr/src/linux-headers-*-"$flavour" 2>/dev/null | sort -V | tail -n1)" || true)
    build="/usr/src/$build"
    common="${build%-"$flavour"}-common"
    stamp="$ver $(basename "$build")"

    if [[ -f $NODEMESH_KHEADERS/.nodemesh-stamp && $(<"$NODEMESH_KHEADERS/.nodemesh-stamp") == "$stamp" ]]; then
        NODEMESH_KHEADERS_VERSION=$ver
        return 0
    fi
    [[ -d $common/include && -d $build/include/generated ]] ||
        nm_die "kernel headers not found at $common and $build" \
            "reinstall them: sudo apt-get install --reinstall $meta $(basename "$build") $(basename "$common")"

    nm_log "building kernel-header tree for bcc at $NODEMESH_KHEADERS (from $(basename "$build"))"
    mkdir -p "$NODEMESH_STATE"
    local tmp old
    tmp=$(mktemp -d "$NODEMESH_STATE/.kheaders.new.XXXXXX")
    mkdir -p "$tmp/arch/$karch"
    cp -a "$common/include" "$tmp/"
    cp -a "$common/arch/$karch/include" "$tmp/arch/$karch/"
    cp -a "$build/include/generated" "$build/include/config" "$tmp/include/"
    cp -a "$build/arch/$karch/include/generated" "$tmp/arch/$karch/include/"
    printf '%s\n' "$stamp" >"$tmp/.nodemesh-stamp"
    chmod 755 "$tmp"
    if [[ -e $NODEMESH_KHEADERS ]]; then
        old=$(mktemp -d "$NODEMESH_STATE/.kheaders.old.XXXXXX")
        mv -T "$NODEMESH_KHEADERS" "$old/kheaders"
        mv -T "$tmp" "$NODEMESH_KHEADERS"
        rm -rf "$old"
    else
        mv -T "$tmp" "$NODEMESH_KHEADERS"
    fi
    NODEMESH_KHEADERS_VERSION=$ver
}

# --- 3. the venv ------------------------------------------------------------------------------

# Succeeds if $1 is a Python >= 3.11 that can create venvs with pip.
nm__python_ok() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

# Sets NM_PY to the interpreter to build the venv with: python3 on PATH if it is >= 3.11 and
# has venv + ensurepip, else Debian's /usr/bin/python3 with python3-venv installed.
nm__pick_python() {
    local py
    if py=$(command -v python3) && nm__python_ok "$py"; then
        NM_PY=$("$py" -c 'import sys; print(sys.executable)')
        return 0
    fi
    nm_apt_install python3-venv
    nm__python_ok /usr/bin/python3 ||
        nm_die "/usr/bin/python3 is not Python >= 3.11 with venv and ensurepip" \
            "this set-up targets Debian 12 (Python 3.11); install python3 and python3-venv >= 3.11"
    NM_PY=/usr/bin/python3
}

# Succeeds if the venv's python runs and is >= 3.11.
nm__venv_ok() {
    [[ -f $NODEMESH_VENV/pyvenv.cfg ]] &&
        "$NODEMESH_VENV/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

nm_venv() {
    local vpy="$NODEMESH_VENV/bin/python" created= py
    if ! nm__venv_ok; then
        nm__pick_python
        py=$NM_PY
        if [[ -e $NODEMESH_VENV ]]; then
            nm_log "recreating $NODEMESH_VENV: its python is missing, broken or older than 3.11"
        else
            nm_log "creating venv $NODEMESH_VENV with $py ($("$py" -V 2>&1))"
        fi
        "$py" -m venv --clear "$NODEMESH_VENV" ||
            nm_die "could not create the venv at $NODEMESH_VENV with $py" \
                "on Debian run: sudo apt-get install python3-venv   (then re-run)"
        created=1
    fi

    local stampf="$NODEMESH_VENV/.nodemesh-pyproject.sha256" sum
    sum=$(sha256sum "$NODEMESH_ROOT/pyproject.toml" | cut -d' ' -f1)
    if [[ -n $created || ! -f $stampf || $(<"$stampf") != "$sum" ]]; then
        nm_log "installing python packages: pip install -e '.[test]' into .venv"
        rm -f "$stampf"
        if ! (cd "$NODEMESH_ROOT" && PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1 \
            "$vpy" -m pip install -q --disable-pip-version-check --progress-bar off -e '.[test]'); then
            nm_die "pip install -e '.[test]' failed (see pip's error above)" \
                "check PyPI is reachable and pyproject.toml is valid, then re-run"
        fi
        printf '%s\n' "$sum" >"$stampf"
    fi
    NODEMESH_PYTHON_VERSION=$("$vpy" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
}

# --- 4. bcc into the venv ---------------------------------------------------------------------

nm_bcc_link() {
    local target=/usr/lib/python3/dist-packages/bcc xy link
    [[ -d $target ]] ||
        nm_die "Debian's bcc is missing at $target" "run: sudo apt-get install --reinstall python3-bpfcc"
    xy=${NODEMESH_PYTHON_VERSION%.*}
    link="$NODEMESH_VENV/lib/python$xy/site-packages/bcc"
    [[ -L $link && $(readlink "$link") == "$target" ]] && return 0
    if [[ -e $link || -L $link ]]; then
        nm_log "replacing $link (not a link to Debian's bcc; the PyPI 'bcc' is an unrelated package)"
        rm -rf "$link"
    else
        nm_log "linking Debian's bcc into the venv"
    fi
    ln -s "$target" "$link"
}

# --- everything -------------------------------------------------------------------------------

nodemesh_setup() {
    local t0=$EPOCHREALTIME
    nm_require_root "$@"
    set -E
    trap 'nm__on_err $? "${BASH_SOURCE[0]##*/}:$LINENO" "$BASH_COMMAND"' ERR

    mkdir -p "$NODEMESH_STATE"
    # One set-up at a time on this machine (apt, the header tree, pip into a shared venv).
    exec {nm__lock_fd}>"$NODEMESH_STATE/setup.lock"
    if ! flock -n "$nm__lock_fd"; then
        nm_log "waiting for another nodemesh set-up to finish (lock $NODEMESH_STATE/setup.lock)"
        flock -w 1800 "$nm__lock_fd" ||
            nm_die "timed out waiting for $NODEMESH_STATE/setup.lock" "check for a stuck scripts/test or scripts/lab"
    fi

    nm_apt_install "${NODEMESH_APT_PACKAGES[@]}"
    nm_kheaders
    nm_venv
    nm_bcc_link
    export BCC_KERNEL_SOURCE="$NODEMESH_KHEADERS"
    # cgroup v2: on hybrid hosts it lives at /sys/fs/cgroup/unified; mounting one where it is
    # absent is left to the lab/agent (KERNEL-NOTES), nothing to do here yet.

    exec {nm__lock_fd}>&-
    trap - ERR
    set +E

    local bcc_ver
    bcc_ver=$(dpkg-query -W -f='${Version}' python3-bpfcc)
    bcc_ver=${bcc_ver%%[+-]*}
    nm_log "$(printf 'ready: python %s, bcc %s, headers %s (%.1fs)' "$NODEMESH_PYTHON_VERSION" \
        "$bcc_ver" "${NODEMESH_KHEADERS_VERSION%%-*}" "$(nm__elapsed "$t0")")"
}

nm__elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
