/* cgroup_connect4_redirect.c: outbound capture. cgroup/connect4 (and cgroup/connect6 for
 * IPv4-mapped destinations) on each enrolled workload's cgroup: a TCP connect() to anything but
 * loopback, the pod's own addresses or from a socket carrying PROXY_MARK is rewritten to
 * 127.0.0.1:OUTBOUND_PORT, resolved in the client's own netns (the pod's in-pod listener), and
 * the original destination is recorded by socket cookie for sockops_origdst.c to re-key, with the
 * caller's cgroup id (host workloads, which share the host netns's 15001, are told apart by it).
 * Returns 1 (allow) always: this program never refuses a connect.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "origdst.h"

#define LOOPBACK_NET 0x7f000000   /* 127.0.0.0/8, host order */

static __always_inline int nm_skip(struct bpf_sock_addr *ctx, __u32 dst_ip4)
{
    __u32 host = bpf_ntohl(dst_ip4);
    if ((host & 0xff000000) == LOOPBACK_NET || host == 0)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    __u32 mark = sk->mark;
    if (mark == PROXY_MARK)
        return 1;
    struct own_addr_key own = {};
    own.netns_cookie = bpf_get_netns_cookie(ctx);
    own.ip4 = dst_ip4;
    __u8 *is_own = own_addrs.lookup(&own);
    if (is_own)
        return 1;
    return 0;
}

static __always_inline void nm_record(struct bpf_sock_addr *ctx, __u32 dst_ip4)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origdst od = {};
    od.ip4 = dst_ip4;
    od.port = bpf_ntohs((__u16)ctx->user_port);
    od.cgroup_id = bpf_get_current_cgroup_id();   /* who: host workloads share one 15001 */
    origdst_by_cookie.update(&cookie, &od);
}

int nm_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    __u32 dst = ctx->user_ip4;
    if (nm_skip(ctx, dst))
        return 1;
    nm_record(ctx, dst);
    /* one store each: clang may merge two into one 8-byte store the verifier rejects */
    volatile __u32 *ip = &ctx->user_ip4;
    *ip = bpf_htonl(0x7f000001);
    volatile __u32 *port = &ctx->user_port;
    *port = bpf_htons(OUTBOUND_PORT);
    return 1;
}

/* AF_INET6 sockets: only IPv4-mapped destinations (::ffff:a.b.c.d, a dual-stack client talking
 * IPv4) are redirected, to ::ffff:127.0.0.1, which reaches the IPv4 listener. Native IPv6 passes
 * untouched: the in-pod listeners are IPv4 only. */
int nm_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    __u32 w0 = ctx->user_ip6[0];
    __u32 w1 = ctx->user_ip6[1];
    __u32 w2 = ctx->user_ip6[2];
    if (w0 != 0 || w1 != 0 || w2 != bpf_htonl(0x0000ffff))
        return 1;
    __u32 dst = ctx->user_ip6[3];
    if (nm_skip(ctx, dst))
        return 1;
    nm_record(ctx, dst);
    volatile __u32 *ip3 = &ctx->user_ip6[3];
    *ip3 = bpf_htonl(0x7f000001);
    volatile __u32 *port = &ctx->user_port;
    *port = bpf_htons(OUTBOUND_PORT);
    return 1;
}
