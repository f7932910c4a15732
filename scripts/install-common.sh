# shellcheck shell=bash
# What scripts/install-controller and scripts/install-node share (sourced, not run directly):
# the install root, the venv in /opt/nodemesh, files written only when their content changes
# (so a second run changes nothing and says so), the units from `nodemesh install systemd`,
# and systemctl when systemd runs this machine. Builds on scripts/setup.sh's helpers
# (nm_log, nm_die, nm_apt_install, nm_kheaders, nm_bcc_link). Lines are prefixed "[install]".

NM_LOG_TAG=install
unset PYTHONPATH PYTHONHOME   # the installed venv must run its own nodemesh, not one from here
# shellcheck source=scripts/setup.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/setup.sh"

NI_PREFIX=/opt/nodemesh          # as the units name it; the files go to $NI_ROOT$NI_PREFIX
NI_UNIT_DIR=/etc/systemd/system
NI_CONFIG_DIR=/etc/nodemesh
NI_ROOT=                         # --root DIR (tests): everything goes below DIR; "" is /
NI_WHEEL=                        # --wheel FILE: install it instead of the checkout
NI_NO_START=
NI_UNINSTALL=
NI_PURGE=
NI_CHANGED=0                     # what this run changed; 0 at the end: "nothing changed"

# Parses the options both scripts take; the rest are left in NI_ARGS for the script's own.
ni_common_args() {
    NI_ARGS=()
    while (($#)); do
        case $1 in
            --root) NI_ROOT=${2:?--root needs a directory}; shift ;;
            --wheel) NI_WHEEL=${2:?--wheel needs a file}; shift ;;
            --no-start) NI_NO_START=1 ;;
            --uninstall) NI_UNINSTALL=1 ;;
            --purge) NI_PURGE=1 ;;
            *) NI_ARGS+=("$1") ;;
        esac
        shift
    done
    if [[ -n $NI_ROOT ]]; then
        mkdir -p "$NI_ROOT"
        NI_ROOT=$(cd "$NI_ROOT" && pwd -P)
        [[ $NI_ROOT == / ]] && NI_ROOT=
    fi
    [[ -z $NI_PURGE || -n $NI_UNINSTALL ]] || nm_die "--purge goes with --uninstall" "run: $0 --uninstall --purge"
    if [[ -n $NI_WHEEL ]]; then
        [[ -f $NI_WHEEL && $NI_WHEEL == *.whl ]] ||
            nm_die "--wheel $NI_WHEEL is not a wheel file" "build one with: pip wheel --no-deps -w dist $NODEMESH_ROOT"
        NI_WHEEL=$(cd "$(dirname "$NI_WHEEL")" && pwd -P)/$(basename "$NI_WHEEL")
    fi
    NI_VENV=$NI_ROOT$NI_PREFIX/venv
}

ni_changed() { NI_CHANGED=$((NI_CHANGED + 1)); nm_log "$*"; }

# ni_put SRC DEST MODE: install SRC as DEST unless DEST already has that content and mode.
ni_put() {
    local src=$1 dest=$2 mode=$3
    if [[ -f $dest ]] && cmp -s "$src" "$dest" && [[ $(stat -c %a "$dest") == "${mode#0}" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$src" "$dest.nodemesh-new"
    mv -f "$dest.nodemesh-new" "$dest"
    ni_changed "wrote $dest"
}

# ni_remove PATH...: remove what exists, saying so.
ni_remove() {
    local p
    for p in "$@"; do
        if [[ -e $p || -L $p ]]; then
            rm -rf -- "$p"
            ni_changed "removed $p"
        fi
    done
}

# ni_rmdir_empty DIR...: remove directories left empty (deepest first).
ni_rmdir_empty() {
    local d
    for d in "$@"; do
        [[ -d $d ]] && rmdir --ignore-fail-on-non-empty -- "$d"
    done
    return 0
}

# The fingerprint of what would be installed: the wheel's bytes, or the checkout's sources.
ni__source_sum() {
    if [[ -n $NI_WHEEL ]]; then
        sha256sum "$NI_WHEEL" | cut -d' ' -f1
        return
    fi
    (cd "$NODEMESH_ROOT" && find agent controller bpf -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
        LC_ALL=C sort -z | xargs -0 sha256sum && sha256sum pyproject.toml README.md) | sha256sum | cut -d' ' -f1
}

# ni_venv: $NI_VENV with nodemesh from the checkout (not editable) or --wheel, made again only
# when what would be installed changed.
ni_venv() {
    local stampf="$NI_VENV/.nodemesh-source.sha256" sum src tmp
    sum=$(ni__source_sum)
    if [[ -x $NI_VENV/bin/nodemesh && -f $stampf && $(<"$stampf") == "$sum" ]] &&
        "$NI_VENV/bin/python" -c 'import agent, controller' 2>/dev/null; then
        return 0
    fi
    # A service's python must not live under a home directory (the units' ProtectHome=yes hides
    # it): Debian's /usr/bin/python3 first, then whatever setup.sh would pick.
    if nm__python_ok /usr/bin/python3; then NM_PY=/usr/bin/python3; else nm__pick_python; fi
    case $(readlink -f "$NM_PY") in
        /root/* | /home/*) nm_die "$NM_PY is under a home directory, which the units' ProtectHome=yes hides" \
            "install Debian's python: apt-get install python3 python3-venv (then re-run)" ;;
    esac
    nm_log "creating $NI_VENV with $NM_PY ($("$NM_PY" -V 2>&1))"
    mkdir -p "$(dirname "$NI_VENV")"
    "$NM_PY" -m venv --clear "$NI_VENV" ||
        nm_die "could not create the venv at $NI_VENV with $NM_PY" "on Debian run: apt-get install python3-venv (then re-run)"
    tmp=
    if [[ -n $NI_WHEEL ]]; then
        src=$NI_WHEEL
    else
        # pip builds a directory in place (build/, *.egg-info): build from a copy of the sources.
        tmp=$(mktemp -d /tmp/nodemesh-install.XXXXXX)
        (cd "$NODEMESH_ROOT" && cp -a agent controller bpf pyproject.toml README.md "$tmp/")
        src=$tmp
    fi
    nm_log "installing nodemesh from ${NI_WHEEL:-the checkout $NODEMESH_ROOT} into $NI_VENV (pip)"
    if ! PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1 "$NI_VENV/bin/python" -m pip install -q \
        --disable-pip-version-check --progress-bar off "$src"; then
        [[ -z $tmp ]] || rm -rf "$tmp"
        nm_die "pip install of nodemesh into $NI_VENV failed (see pip's error above)" \
            "check that PyPI (or your index, PIP_INDEX_URL) is reachable, then re-run"
    fi
    [[ -z $tmp ]] || rm -rf "$tmp"
    printf '%s\n' "$sum" >"$stampf"
    ni_changed "installed nodemesh $("$NI_VENV/bin/nodemesh" --version | awk '{print $NF}') into $NI_VENV"
}

# ni_cli_link: /usr/local/bin/nodemesh -> the venv's, so `nodemesh ...` works from a shell
# (left alone if something else is there).
ni_cli_link() {
    local link=$NI_ROOT/usr/local/bin/nodemesh target=$NI_PREFIX/venv/bin/nodemesh
    [[ $(readlink "$link" 2>/dev/null) == "$target" ]] && return 0
    if [[ -e $link || -L $link ]]; then
        nm_log "not linking $link: something else is there (run $target instead)"
        return 0
    fi
    mkdir -p "$(dirname "$link")"
    ln -s "$target" "$link"
    ni_changed "linked $link -> $target"
}

# ni_unit NAME ARGS...: write $NI_UNIT_DIR/NAME from `nodemesh install systemd ARGS...`.
ni_unit() {
    local name=$1 tmp
    shift
    tmp=$(mktemp)
    if ! "$NI_VENV/bin/nodemesh" install systemd "$@" --prefix "$NI_PREFIX" >"$tmp"; then
        rm -f "$tmp"
        nm_die "nodemesh install systemd $* failed (above)" "fix the option it names and re-run"
    fi
    ni_put "$tmp" "$NI_ROOT$NI_UNIT_DIR/$name" 0644
    rm -f "$tmp"
}

# Succeeds when systemd runs this machine and we install into it (not --root, not --no-start).
ni_systemd_here() {
    [[ -z $NI_ROOT && -z $NI_NO_START && -d /run/systemd/system ]]
}

ni__why_not_started() {
    if [[ -n $NI_ROOT ]]; then echo "installed below --root $NI_ROOT"
    elif [[ -n $NI_NO_START ]]; then echo "--no-start"
    else echo "systemd is not running this machine (PID 1 is $(ps -o comm= -p 1 2>/dev/null || echo unknown))"
    fi
}

# ni_start NAME: enable and (re)start the unit when systemd runs here; else say what to run.
ni_start() {
    local name=$1
    if ! ni_systemd_here; then
        nm_log "not enabling or starting $name: $(ni__why_not_started)"
        nm_log "  on a systemd host: systemctl daemon-reload && systemctl enable --now $name"
        return 0
    fi
    ((NI_CHANGED == 0)) || systemctl daemon-reload
    if ! systemctl is-enabled -q "$name"; then
        systemctl enable -q "$name"
        ni_changed "enabled $name"
    fi
    if ! systemctl is-active -q "$name"; then
        systemctl start --no-block "$name"
        ni_changed "starting $name (follow it with: journalctl -u $name -f)"
    elif ((NI_CHANGED > 0)); then
        systemctl restart --no-block "$name"
        ni_changed "restarting $name: its unit or code changed"
    fi
}

# ni_stop NAME: disable and stop the unit when systemd runs here.
ni_stop() {
    local name=$1
    ni_systemd_here || return 0
    if systemctl is-enabled -q "$name" 2>/dev/null || systemctl is-active -q "$name"; then
        systemctl disable -q --now "$name"
        ni_changed "stopped and disabled $name"
    fi
}

# ni_remove_venv: remove /opt/nodemesh unless the other side's unit still uses it.
ni_remove_venv() {
    local other=$1
    if [[ -f $NI_ROOT$NI_UNIT_DIR/$other ]]; then
        nm_log "keeping $NI_ROOT$NI_PREFIX: $other still uses it"
        return 0
    fi
    ni_remove "$NI_ROOT$NI_PREFIX"
    if [[ $(readlink "$NI_ROOT/usr/local/bin/nodemesh" 2>/dev/null) == "$NI_PREFIX/venv/bin/nodemesh" ]]; then
        ni_remove "$NI_ROOT/usr/local/bin/nodemesh"
    fi
}

# ni_done DONE UNCHANGED: the last line, e.g. "the agent is installed" / "... already installed".
ni_done() {
    if ((NI_CHANGED == 0)); then
        nm_log "nothing changed: $2"
    else
        nm_log "done: $1 (changes: $NI_CHANGED)"
    fi
}
