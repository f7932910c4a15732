#!/usr/bin/env bash
# node.sh SRC SHARED NODE NODES PODS_PER_NODE CONTROLLER_URL REDIRECT: provision a node VM.
# Builds this node's demo pods (network namespaces and cgroups behind this host, as `scripts/lab
# up` builds them behind a lab node) with their apps, then installs the agent with
# scripts/install-node, joining with the token the controller VM left in SHARED. Idempotent.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SRC=${1:?usage: node.sh SRC SHARED NODE NODES PODS_PER_NODE CONTROLLER_URL REDIRECT}
SHARED=${2:?} NODE=${3:?} NODES=${4:?} PODS=${5:?} URL=${6:?} REDIRECT=${7:-auto}
FABRIC=${NODEMESH_FABRIC:-192.168.56.0/24}

wait_for "the join token $SHARED/$NODE.token (provision the controller first)" 600 test -s "$SHARED/$NODE.token"
mapfile -t extra < <(root_args)
"$SRC/scripts/install-node" --controller "$URL" --node "$NODE" --token "$SHARED/$NODE.token" \
    --ca "$SHARED/ca.crt" --redirect "$REDIRECT" "${extra[@]}"
venv=$ROOT/opt/nodemesh/venv

log "building $NODE's demo pods"
"$venv/bin/nodemesh" lab node up --node "$NODE" --nodes "$NODES" --pods-per-node "$PODS" --fabric "$FABRIC" \
    --dir "$ROOT/run/nodemesh-lab"

if ! systemd_here; then
    start_background nodemesh-agent "$venv/bin/nodemesh" agent run --node "$NODE" --controller "$URL" \
        --token "$ROOT/etc/nodemesh/agent/token" --ca "$ROOT/etc/nodemesh/agent/ca.crt" \
        --state-dir "$ROOT/var/lib/nodemesh/agent" --redirect "$REDIRECT"
fi
wait_for "the agent's readiness (journalctl -u nodemesh-agent says why)" 180 \
    "$venv/bin/python" -c 'import sys, urllib.request; sys.exit(urllib.request.urlopen("http://127.0.0.1:15021/healthz/ready", timeout=2).status != 200)'
log "$NODE ready: try  sudo nodemesh lab exec client-1 -- curl -s http://10.96.0.10/  on node-1"
