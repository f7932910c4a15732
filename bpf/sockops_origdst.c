/* sockops_origdst.c: re-keys a redirected connection's original destination from its socket
 * cookie (known at connect4 time, before the source port exists) to (netns cookie, client ip,
 * client port) — what the proxy sees of the accepted connection. Attached to the same cgroups as
 * cgroup_connect4_redirect.c. Runs at TCP_CONNECT_CB (the SYN is about to leave, the source port
 * is bound), so the entry exists before the proxy can accept; ACTIVE_ESTABLISHED_CB is a
 * fallback. Never changes the connection.
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include "origdst.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct origdst *od = origdst_by_cookie.lookup(&cookie);
    if (!od)
        return 1;
    struct origdst val = *od;
    struct origdst_key key = {};
    key.netns_cookie = bpf_get_netns_cookie(skops);
    /* local_ip4 is the IPv4 source for AF_INET and for IPv4-mapped AF_INET6 sockets alike */
    key.ip4 = skops->local_ip4;
    key.port = (__u16)skops->local_port;
    origdst_by_peer.update(&key, &val);
    origdst_by_cookie.delete(&cookie);
    return 1;
}
