/* sk_lookup_inbound.c: inbound capture. Attached (as a bpf_link) to each enrolled pod's netns
 * (and, for host workloads, to the host netns, where only their (address, declared port) pairs in
 * host_inbound are steered):
 * a TCP SYN from outside the pod (its source is neither loopback nor the destination itself) for
 * one of the pod's own IPv4 addresses, on any port but INBOUND_HBONE_PORT, is handed to the pod's INBOUND_PLAIN_PORT listener (the
 * socket the agent registered in inbound_listeners). The accepted socket keeps the original local
 * address, so getsockname() is the original destination. Everything else takes the normal lookup.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "origdst.h"

/* The pod's own connections to its own address (the proxy delivering to the app) are told apart
 * by their source, not by ingress_ifindex: for local delivery that is the device owning the
 * address (the veth), not lo. A connect() to a local address gets that same address as its
 * source (unless the socket was bound to another), so "from inside" = source is the destination
 * or loopback. */
static __always_inline int nm_from_pod(__u32 remote_ip4, __u32 local_ip4)
{
    return (bpf_ntohl(remote_ip4) >> 24) == 127 || remote_ip4 == local_ip4;
}

int nm_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    __u32 port = ctx->local_port;
    if (port == INBOUND_HBONE_PORT || port == INBOUND_PLAIN_PORT)
        return SK_PASS;
    __u32 dst = ctx->local_ip4;
    __u32 src = ctx->remote_ip4;
    if (nm_from_pod(src, dst))
        return SK_PASS;
    struct bpf_sock *sk = (struct bpf_sock *)inbound_listeners.lookup(&dst);
    if (!sk) {
        /* the host netns: only a host workload's own (address, declared port), never the rest */
        struct host_port_key hk = {};
        hk.ip4 = dst;
        hk.port = (__u16)port;
        sk = (struct bpf_sock *)host_inbound.lookup(&hk);
        if (!sk)
            return SK_PASS;
    }
    bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return SK_PASS;
}
