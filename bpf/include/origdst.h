/* origdst.h: the maps and structs the nodemesh eBPF redirect programs share with the agent.
 *
 * Python mirror: agent/redirect/bpfmaps.py (OrigdstKey, Origdst, OwnAddrKey, HostPortKey). A unit test
 * (tests/agent/redirect/test_ebpf.py) compares ctypes.sizeof and every field offset with this
 * layout, so change both together. Addresses are in network byte order, ports in HOST byte order.
 *
 * Parameters come in as cflags (never by string replacement):
 *   OUTBOUND_PORT (15001), INBOUND_PLAIN_PORT (15006), INBOUND_HBONE_PORT (15008), PROXY_MARK (0x539).
 */
#ifndef NODEMESH_ORIGDST_H
#define NODEMESH_ORIGDST_H

#ifndef OUTBOUND_PORT
#error "compile with -DOUTBOUND_PORT=15001"
#endif
#ifndef PROXY_MARK
#error "compile with -DPROXY_MARK=0x539"
#endif
#ifndef INBOUND_PLAIN_PORT
#define INBOUND_PLAIN_PORT 15006
#endif
#ifndef INBOUND_HBONE_PORT
#define INBOUND_HBONE_PORT 15008
#endif
#ifndef MAP_ENTRIES
#define MAP_ENTRIES 65536
#endif

/* Where a redirected connection was going (value of both origdst maps), and who made it. */
struct origdst {
    __u32 ip4;              /* original destination address, network byte order */
    __u16 port;             /* original destination port, host byte order */
    __u16 pad;              /* zero */
    __u64 cgroup_id;        /* bpf_get_current_cgroup_id() of the connecting process: tells host
                               workloads apart (they share the host netns, its 127.0.0.1:15001 and
                               so its keys); the agent maps it to a Workload (the cgroup v2
                               directory's inode number, os.stat(dir).st_ino) */
};

/* The redirected client socket as the proxy sees it after accept(): the netns cookie of the
 * pod (every pod's loopback is 127.0.0.1), the client's address and port (its getpeername()). */
struct origdst_key {
    __u64 netns_cookie;     /* bpf_get_netns_cookie() == getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) */
    __u32 ip4;              /* client address, network byte order */
    __u16 port;             /* client port, host byte order */
    __u16 pad;              /* zero */
};

/* One of a pod's own addresses: connections to it are not redirected (as in iptables mode). */
struct own_addr_key {
    __u64 netns_cookie;
    __u32 ip4;              /* network byte order */
    __u32 pad;              /* zero */
};

/* A host workload's address and port (host netns only): inbound plaintext to exactly these is
 * steered to the host 15006 listener of that address; the host's other traffic is left alone. */
struct host_port_key {
    __u32 ip4;              /* network byte order */
    __u16 port;             /* host byte order, as bpf_sk_lookup.local_port */
    __u16 pad;              /* zero */
};

/* connect4/connect6 -> sockops: original destination by socket cookie (short-lived). */
BPF_TABLE("lru_hash", __u64, struct origdst, origdst_by_cookie, MAP_ENTRIES);
/* sockops -> agent: original destination by (netns cookie, client ip, client port). */
BPF_TABLE("lru_hash", struct origdst_key, struct origdst, origdst_by_peer, MAP_ENTRIES);
/* agent -> connect4: addresses of each pod that stay unredirected (value unused, 1). */
BPF_TABLE("hash", struct own_addr_key, __u8, own_addrs, 4096);
/* agent -> sk_lookup: a pod's own IPv4 address -> the pod's 15006 listening socket. */
BPF_TABLE("sockhash", __u32, __u32, inbound_listeners, 4096);
/* agent -> sk_lookup: a host workload's (address, declared port) -> its host 15006 listening socket. */
BPF_TABLE("sockhash", struct host_port_key, __u32, host_inbound, 4096);

#endif
