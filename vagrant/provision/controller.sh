#!/usr/bin/env bash
# controller.sh SRC SHARED CONTROLLER_IP NODES PODS_PER_NODE: provision the controller VM.
# Installs the controller with scripts/install-controller, applies the lab's demo mesh (the
# same Services, Workloads and policies as `scripts/lab up`) and leaves a join token per node
# and the mesh's CA in SHARED for the node VMs. Idempotent: a second run changes nothing but
# fresh tokens.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SRC=${1:?usage: controller.sh SRC SHARED CONTROLLER_IP NODES PODS_PER_NODE}
SHARED=${2:?} IP=${3:?} NODES=${4:?} PODS=${5:?}
FABRIC=${NODEMESH_FABRIC:-192.168.56.0/24}

mapfile -t extra < <(root_args)
"$SRC/scripts/install-controller" --san "$IP" "${extra[@]}"
venv=$ROOT/opt/nodemesh/venv
data=$ROOT/var/lib/nodemesh/controller
export NODEMESH_CONFIG=$ROOT${HOME:-/root}/.config/nodemesh/config.yaml
if ! systemd_here; then
    start_background nodemesh-controller "$venv/bin/nodemesh" controller run --data-dir "$data"
fi
wait_for "the controller's API" 60 "$venv/bin/nodemesh" status

log "applying the demo mesh (${NODES} nodes, ${PODS} pods each)"
"$venv/bin/nodemesh" lab manifest --nodes "$NODES" --pods-per-node "$PODS" --fabric "$FABRIC" --controller-ip "$IP" |
    "$venv/bin/nodemesh" apply -f -
mkdir -p "$SHARED"
install -m 0644 "$data/ca/bundle.crt" "$SHARED/ca.crt"
for n in $(seq 1 "$NODES"); do
    "$venv/bin/nodemesh" token create --node "node-$n" --ttl 24h >"$SHARED/node-$n.token.tmp"
    mv "$SHARED/node-$n.token.tmp" "$SHARED/node-$n.token"
done
log "controller ready at https://$IP:15012; tokens and ca.crt in $SHARED"
