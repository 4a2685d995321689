// SPDX-License-Identifier: Apache-2.0
//
// Published ports at the TC hook (tcx), for IPv4: the Maglev fast path.
//
// A packet arriving on an attached interface for a published port of this host is
// given a task by the frontend's Maglev ring, which every agent builds the same way
// from the same task list, so every host picks the same task for the same client
// address and port. The choice is kept in an LRU flow map, so a flow keeps its task
// while the ring changes (see forward() for when it picks again).
//
// - A task on this host: on ingress, the destination is rewritten to the task (DNAT)
//   and the packet goes on up the stack; the task sees the client's own address. On
//   egress, the task's reply is rewritten back to the published address and port
//   (after netfilter, so conntrack sees the flow as the task does).
// - A task on another host: the packet is rewritten to come from this host (SNAT, to
//   a port bound in mesh_port_unsnat) and go to the task, and is sent straight out of
//   the interface the agent found the route to the task on (bpf_redirect_neigh): the
//   stack, netfilter and conntrack never see it. The task's reply, arriving on that
//   interface, is rewritten back (from the published address and port, to the client)
//   and sent out towards the client the same way. The task sees this host's address.
//   Without a route from the agent (the way to the task is not through an attached
//   interface) or a free port, the packet is left alone, for the plane that serves
//   the port (the userspace plane or nftables).
//
// With ebpf.port_hook "xdp", mesh_port_xdp runs the same rules at the XDP hook, the
// earliest a driver offers (before an skb is built, where the driver has native XDP;
// veth runs it on the skb its peer sent). It takes a flow whose pick is this host's
// task (DNAT), counts it in mesh_port_xdp_took, and marks the packet (XDP metadata)
// so that the tcx ingress program, still attached, leaves it alone. Anything else (a
// hop, a reply from another host's task, a checksum left to offload) is passed on
// to the tcx program, which can redirect it (XDP has no bpf_redirect_neigh) and
// update any checksum. So XDP is only ever a shortcut: without it (detached, or its
// mark refused) every packet still gets the tcx path.
//
// Every address and port in a map is in network byte order. The agent fills the maps
// (ebpf/src/port_layout.rs mirrors these layouts).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

// How many ports are tried for a new hopped flow before it is left to the other plane.
#define BIND_TRIES 16
// When a bound port may go to another client, in ticks of 2^30 ns (about a second)
// after the flow's last packet. TCP: only once the connection ended (both FINs, or an
// RST): 60 when the task closed first, since the task then holds the 4-tuple in
// TIME_WAIT for 60 s and would meet a new client's SYN with the old connection's
// ACK; 10 when the client closed first or a RST ended it. An open connection keeps its
// port for as long as conntrack keeps an established one (5 days idle), as a FIN or
// RST may never be seen. UDP: 120 ticks after the last packet, as conntrack keeps a
// UDP flow that had replies. The same client (address and port) may take its port
// back at once.
#define REUSE_TCP_CLOSED 10
#define REUSE_TCP_TIME_WAIT 60
#define REUSE_TCP_OPEN 432000
#define REUSE_UDP_IDLE 120
// A flow left to the other plane stays there for as long as it has packets, and this
// long after: so it never moves between planes mid-flow.
#define LEFT_FOR 120

// How a hopped TCP connection ended (struct unsnat's `closed`).
#define FIN_FROM_CLIENT 1
#define FIN_FROM_TASK 2
#define ENDED_BY_RST 4
#define TASK_CLOSED_FIRST 8

// The most tasks one published port balances over, and the Maglev ring's size (a
// prime above 100 times MAX_SLOTS would be better; 16381 keeps a change's
// reassignment near 1% up to about 160 tasks).
#define MAX_SLOTS 256
#define RING 16381

struct port_key {
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct port_backend {
	__u32 ip;
	__u16 port;
	// 1: a task on this host, taken here by DNAT; 0: another host's, hopped there.
	__u8 local;
	__u8 pad;
};

// A published port's whole state in one value, so the agent switches it with one
// map update: a packet sees the old ring or the new one, never a mix.
struct port_frontend {
	__u32 count;
	__u32 pad;
	struct port_backend backends[MAX_SLOTS];
	// Maglev ring: an index into backends for each of RING slots.
	__u16 ring[RING];
	__u16 pad2;
};
_Static_assert(sizeof(struct port_frontend) == 8 + 8 * MAX_SLOTS + 2 * RING + 2,
	       "ebpf/src/port_layout.rs mirrors this layout");

// One direction of a flow. For the flow map: the client's packet as it arrived. For
// the reverse map: the task's reply as the task sends it.
struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct nat {
	__u32 ip;
	__u16 port;
	__u16 pad;
};

// How a flow taken to another host's task leaves this host: from ip:port (SNAT),
// through the interface ifindex (0: the flow is left to the other plane). Value of
// mesh_port_snat, keyed by the client's packet as it arrived (a flow_key).
struct snat {
	__u32 task_ip;
	__u32 ip;
	__u32 ifindex;
	__u32 seen;
	__u16 task_port;
	__u16 port;
};

// Whose a bound port is: value of mesh_port_unsnat, keyed by the task's reply as it
// arrives (from the task, to the bound ip:port).
struct unsnat {
	__u32 client_ip;
	__u32 published_ip;
	// The interface the client's packets came in on, where its replies go out.
	__u32 ifindex;
	// The interface towards the task: a reply must arrive there (one claiming to
	// be the task's on another interface is spoofed).
	__u32 task_ifindex;
	__u32 seen;
	__u16 client_port;
	__u16 published_port;
	// How the connection ended: FIN_FROM_CLIENT, FIN_FROM_TASK, ENDED_BY_RST,
	// TASK_CLOSED_FIRST (0 while it is open). Set with atomic ORs: the two
	// directions run on different CPUs.
	__u32 closed;
};

// The way to a task of another host, found by the agent (RTM_GETROUTE): the
// interface and this host's source address. Only routes through an attached
// interface are written, so the task's replies come back to a program of ours.
struct route {
	__u32 ifindex;
	__u32 src;
};

// The ports a hopped flow may be bound to, in host byte order: span ports from
// first, skipping skip_len ports from skip_from (the kernel's ip_local_port_range,
// so a bound port never meets a connection this host's own sockets make), and the
// ports of mesh_port_reserved. `seed` keys the hash of the candidates, so a client
// cannot tell which port it will be given.
struct port_config {
	__u16 first;
	__u16 span;
	__u16 skip_from;
	__u16 skip_len;
	__u32 seed;
};

// The ports no hopped flow may be bound to, one bit each: those this host listens on
// or has bound (TCP and UDP), its tasks' and its published ones. A bound port that
// equals a port in use here would make a 4-tuple that is also another host's (its
// hop to our task) or a local socket's.
struct reserved_ports {
	__u64 bits[1024];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct port_key);
	__type(value, struct port_frontend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct flow_key);
	__type(value, struct port_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct flow_key);
	__type(value, struct nat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_revnat SEC(".maps");

// The hopped flows and their bound ports, one entry in each per flow: plain hashes,
// not LRU, so a live flow is never evicted (an idle connection keeps its port). A
// port goes to another flow only by the rules of reusable(), and the old flow's
// entry in mesh_port_snat goes with it; when every candidate port is held, a new flow
// is left to the other plane.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, struct flow_key);
	__type(value, struct snat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_snat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, struct flow_key);
	__type(value, struct unsnat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_unsnat SEC(".maps");

// Flows the kernel path does not carry, by the client's packet: `drop` 0 for one left
// to the other plane (no route or no free port at its first packet), 1 for one whose
// port went to another flow (the rest of it cannot be delivered).
struct left {
	__u32 seen;
	__u32 drop;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct left);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_left SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct route);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct port_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct reserved_ports);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_reserved SEC(".maps");

// This host's IPv4 addresses, kept by the agent: only packets to one of them are
// published-port traffic (a routed packet that happens to use the port is someone
// else's). bpf_fib_lookup would say so too, but it is for GPL programs only.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_host_addrs SEC(".maps");

// New flows taken here, per published port and task, per CPU: read by the agent
// into mesh_connections_total.
struct pick_key {
	__u32 ip;
	__u16 port;
	__u16 published;
	__u8 proto;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pick_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_picks SEC(".maps");

// Packets mesh_port_xdp took (DNAT at the XDP hook), per CPU: the operator's and the
// tests' evidence that XDP, not tcx, did the work.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_port_xdp_took SEC(".maps");

// The XDP metadata of a packet mesh_port_xdp took: XDP_TOOK ("mesh"), then what its
// DNAT did to the ones' complement sum of the packet's bytes, for tcx to add to
// skb->csum where the driver computed one before XDP ran (CHECKSUM_COMPLETE).
#define XDP_TOOK 0x6d657368
struct xdp_took {
	__u32 magic;
	__u32 csum_diff;
};

// The same mixing on every host (murmur3's finalizer over the client's address,
// port and the protocol): hosts must agree on the slot, not on anything secret.
static __always_inline __u32 mix(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 flow_hash(__u32 saddr, __u16 sport, __u16 dport, __u8 proto)
{
	__u32 h = mix(bpf_ntohl(saddr) ^ 0x6d657368);
	h = mix(h ^ (((__u32)bpf_ntohs(sport) << 16) | bpf_ntohs(dport)));
	return mix(h ^ proto);
}

static __always_inline int still_there(const struct port_frontend *fe, const struct port_backend *b)
{
	__u32 n = fe->count;
	for (__u32 i = 0; i < MAX_SLOTS; i++) {
		if (i >= n)
			break;
		if (fe->backends[i].ip == b->ip && fe->backends[i].port == b->port)
			return 1;
	}
	return 0;
}

struct headers {
	__u32 l3;
	__u32 l4;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	// A TCP packet that opens a connection (SYN without ACK).
	__u8 opens;
	// A TCP packet that ends one: TCP_RST if it carries RST, else TCP_FIN if FIN.
	__u8 ends;
	// The IP packet's length (host order; 0 for a GSO packet too big for the field).
	__u16 tot_len;
};

// A packet at either hook. `xdp` is a constant at each entry point, so the compiler
// keeps only that hook's branch of each helper below (the verifier would refuse the
// other hook's helpers).
struct pkt {
	void *ctx;
	int xdp;
};

static __always_inline long load(const struct pkt *p, __u32 off, void *to, __u32 len)
{
	if (p->xdp)
		return bpf_xdp_load_bytes(p->ctx, off, to, len);
	return bpf_skb_load_bytes(p->ctx, off, to, len);
}

static __always_inline long store(const struct pkt *p, __u32 off, void *from, __u32 len)
{
	if (p->xdp)
		return bpf_xdp_store_bytes(p->ctx, off, from, len);
	return bpf_skb_store_bytes(p->ctx, off, from, len, 0);
}

// The IPv4 TCP or UDP packet's addresses and ports; 0 for anything else (IPv6, ARP,
// any fragment: only the first carries ports, and the rest would go elsewhere).
static __always_inline int parse(const struct pkt *p, struct headers *h)
{
	__u16 ethertype;
	if (p->xdp) {
		if (load(p, 12, &ethertype, sizeof(ethertype)) < 0)
			return 0;
	} else {
		// The skb's protocol, not the header's: a VLAN tag the driver took off
		// leaves the inner protocol here.
		ethertype = ((struct __sk_buff *)p->ctx)->protocol;
	}
	if (ethertype != bpf_htons(ETH_P_IP))
		return 0;
	struct iphdr ip;
	h->l3 = sizeof(struct ethhdr);
	if (load(p, h->l3, &ip, sizeof(ip)) < 0)
		return 0;
	if (ip.ihl < 5 || (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return 0;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return 0;
	h->l4 = h->l3 + ip.ihl * 4;
	__u16 ports[2];
	if (load(p, h->l4, ports, sizeof(ports)) < 0)
		return 0;
	h->saddr = ip.saddr;
	h->daddr = ip.daddr;
	h->tot_len = bpf_ntohs(ip.tot_len);
	h->sport = ports[0];
	h->dport = ports[1];
	h->proto = ip.protocol;
	if (ip.protocol == IPPROTO_TCP) {
		__u8 flags;
		if (load(p, h->l4 + 13, &flags, 1) < 0)
			return 0;
		h->opens = (flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
		h->ends = flags & TCP_RST ? TCP_RST : flags & TCP_FIN;
	}
	return 1;
}

// The packet's own addresses, ports and protocol, as a map key.
static __always_inline struct flow_key key_of(const struct headers *h)
{
	struct flow_key k = {
		.saddr = h->saddr,
		.daddr = h->daddr,
		.sport = h->sport,
		.dport = h->dport,
		.proto = h->proto,
	};
	return k;
}

static __always_inline __u32 l4_csum_off(const struct headers *h)
{
	return h->l4 + (h->proto == IPPROTO_TCP ? 16 : 6);
}

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	return (sum & 0xffff) + (sum >> 16);
}

// The checksum `check` with the 16-bit words of `from` replaced by those of `to`
// (RFC 1624, eqn. 3), for a whole checksum: XDP has no checksum helpers. One's
// complement sums do not care about byte order, so network-order words go in as they
// are.
static __always_inline __u16 replaced(__u16 check, __u32 from, __u32 to, int words)
{
	__u32 sum = (__u16)~check;
	sum += (__u16)~(from & 0xffff) + (to & 0xffff);
	if (words == 2)
		sum += (__u16)~(from >> 16) + (to >> 16);
	return ~fold(sum);
}

// XDP's rewrite of one address and one port with both checksums, whole ones: a
// checksum left to offload (partial_csum) never gets here.
static __always_inline int rewrite_xdp(const struct pkt *p, const struct headers *h, __u32 ip_off,
				       __u32 old_ip, __u32 new_ip, __u32 port_off, __u16 old_port,
				       __u16 new_port)
{
	__u32 csum = l4_csum_off(h);
	__u16 l4, l3;
	if (load(p, csum, &l4, 2) < 0 || load(p, h->l3 + 10, &l3, 2) < 0)
		return -1;
	// A UDP datagram without a checksum keeps none, and 0 means none.
	if (h->proto != IPPROTO_UDP || l4 != 0) {
		l4 = replaced(replaced(l4, old_ip, new_ip, 2), old_port, new_port, 1);
		if (h->proto == IPPROTO_UDP && l4 == 0)
			l4 = 0xffff;
	}
	l3 = replaced(l3, old_ip, new_ip, 2);
	if (store(p, csum, &l4, 2) < 0 || store(p, h->l3 + 10, &l3, 2) < 0 ||
	    store(p, h->l3 + ip_off, &new_ip, 4) < 0 || store(p, h->l4 + port_off, &new_port, 2) < 0)
		return -1;
	return 0;
}

// Rewrites one address (at l3 + ip_off) and one port (at l4 + port_off), with
// the IP and TCP/UDP checksums.
static __always_inline int rewrite(const struct pkt *p, const struct headers *h, __u32 ip_off,
				   __u32 old_ip, __u32 new_ip, __u32 port_off, __u16 old_port,
				   __u16 new_port)
{
	if (p->xdp)
		return rewrite_xdp(p, h, ip_off, old_ip, new_ip, port_off, old_port, new_port);
	struct __sk_buff *skb = p->ctx;
	__u32 csum = l4_csum_off(h);
	// A UDP datagram without a checksum keeps none.
	__u64 mangled = h->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (bpf_l4_csum_replace(skb, csum, old_ip, new_ip, BPF_F_PSEUDO_HDR | mangled | 4) < 0)
		return -1;
	if (old_port != new_port &&
	    bpf_l4_csum_replace(skb, csum, old_port, new_port, mangled | 2) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, h->l3 + 10, old_ip, new_ip, 4) < 0)
		return -1;
	if (store(p, h->l3 + ip_off, &new_ip, 4) < 0)
		return -1;
	if (store(p, h->l4 + port_off, &new_port, 2) < 0)
		return -1;
	return 0;
}

// A task's reply to a flow this program took: from the published address and port.
// 1: rewritten; 0: not a reply of ours; -1: the rewrite failed half-way.
static __always_inline int reverse(const struct pkt *p, const struct headers *h)
{
	struct flow_key rk = key_of(h);
	struct nat *to = bpf_map_lookup_elem(&mesh_port_revnat, &rk);
	if (!to)
		return 0;
	struct nat was = *to;
	if (rewrite(p, h, 12, h->saddr, was.ip, 0, h->sport, was.port) < 0)
		return -1;
	return 1;
}

static __always_inline void count(const struct port_backend *b, const struct headers *h)
{
	struct pick_key k = {
		.ip = b->ip,
		.port = b->port,
		.published = h->dport,
		.proto = h->proto,
	};
	__u64 *n = bpf_map_lookup_elem(&mesh_port_picks, &k);
	if (n) {
		*n += 1;
		return;
	}
	__u64 one = 1;
	bpf_map_update_elem(&mesh_port_picks, &k, &one, BPF_NOEXIST);
}

// About a second: what `seen` counts in.
static __always_inline __u32 ticks(void)
{
	return bpf_ktime_get_coarse_ns() >> 30;
}

// Whether a bound port's entry `u` is the flow of the client packet `h`.
static __always_inline int owns(const struct unsnat *u, const struct headers *h)
{
	return u->client_ip == h->saddr && u->client_port == h->sport &&
	       u->published_ip == h->daddr && u->published_port == h->dport;
}

// Whether a bound port may go to the flow of `h`: it is already that flow's (the client
// reused its address and port, as conntrack would let it), or its flow ended long
// enough ago (see REUSE_TCP_CLOSED).
static __always_inline int reusable(const struct unsnat *cur, const struct headers *h, __u32 now)
{
	if (owns(cur, h))
		return 1;
	__u32 idle = now - cur->seen;
	if (h->proto != IPPROTO_TCP)
		return idle >= REUSE_UDP_IDLE;
	__u32 c = cur->closed;
	if (c & ENDED_BY_RST)
		return idle >= REUSE_TCP_CLOSED;
	if ((c & (FIN_FROM_CLIENT | FIN_FROM_TASK)) != (FIN_FROM_CLIENT | FIN_FROM_TASK))
		return idle >= REUSE_TCP_OPEN;
	return idle >= (c & TASK_CLOSED_FIRST ? REUSE_TCP_TIME_WAIT : REUSE_TCP_CLOSED);
}

static __always_inline int reserved(const struct reserved_ports *r, __u32 port)
{
	__u32 word = port >> 6;
	if (word >= 1024)
		return 1;
	return (r->bits[word] >> (port & 63)) & 1;
}

// The entry of a bound port for the client packet `h`, going out through `s`.
static __always_inline void claim(struct unsnat *u, struct __sk_buff *skb, const struct headers *h,
				  const struct snat *s, __u32 now)
{
	u->client_ip = h->saddr;
	u->published_ip = h->daddr;
	u->ifindex = skb->ifindex;
	u->task_ifindex = s->ifindex;
	u->seen = now;
	u->client_port = h->sport;
	u->published_port = h->dport;
	u->closed = 0;
}

static __always_inline void leave(const struct flow_key *fk, __u32 now, __u32 drop)
{
	struct left l = { .seen = now, .drop = drop };
	bpf_map_update_elem(&mesh_port_left, fk, &l, BPF_ANY);
}

// The mesh_port_snat key of the flow a bound port's entry belongs to.
static __always_inline struct flow_key owner_key(const struct unsnat *u, __u8 proto)
{
	struct flow_key k = {
		.saddr = u->client_ip,
		.daddr = u->published_ip,
		.sport = u->client_port,
		.dport = u->published_port,
		.proto = proto,
	};
	return k;
}

// Binds a port of `route`'s source address to a new flow `fk` from the client to
// another host's task `b`, trying BIND_TRIES ports, and records the flow in
// mesh_port_snat. The first port is the client's own when it is one that may be bound
// (conntrack's masquerade keeps it too), else one picked by a keyed hash of the
// client's address and port: either way, a client that reuses its address and port
// gets the same one back, and clients rarely collide.
static __always_inline int bind_port(struct __sk_buff *skb, const struct headers *h,
				     const struct flow_key *fk, const struct port_backend *b,
				     __u32 now, struct snat *out)
{
	struct route *r = bpf_map_lookup_elem(&mesh_port_routes, &b->ip);
	if (!r)
		return -1;
	__u32 zero = 0;
	struct port_config *cfg = bpf_map_lookup_elem(&mesh_port_config, &zero);
	struct reserved_ports *taken = bpf_map_lookup_elem(&mesh_port_reserved, &zero);
	if (!cfg || cfg->span == 0 || !taken)
		return -1;
	struct port_config c = *cfg;
	out->task_ip = b->ip;
	out->task_port = b->port;
	out->ip = r->src;
	out->ifindex = r->ifindex;
	out->seen = now;
	struct unsnat want = {};
	claim(&want, skb, h, out, now);
	__u32 hash = flow_hash(h->saddr ^ h->daddr ^ c.seed, h->sport, h->dport, h->proto);
	__u32 own = bpf_ntohs(h->sport);
	int own_ok = own >= c.first && (own < c.skip_from || own >= (__u32)c.skip_from + c.skip_len);
	for (__u32 i = 0; i < BIND_TRIES; i++) {
		__u32 port = c.first + (hash + i * 0x9e3779b1) % c.span;
		if (port >= c.skip_from)
			port += c.skip_len;
		if (i == 0 && own_ok)
			port = own;
		if (port > 0xffff || reserved(taken, port))
			continue;
		struct flow_key rk = {
			.saddr = b->ip,
			.daddr = out->ip,
			.sport = b->port,
			.dport = bpf_htons((__u16)port),
			.proto = h->proto,
		};
		struct unsnat *cur = bpf_map_lookup_elem(&mesh_port_unsnat, &rk);
		if (cur && !reusable(cur, h, now))
			continue;
		struct flow_key old = {};
		int other = cur && !owns(cur, h);
		if (other)
			old = owner_key(cur, h->proto);
		// Two CPUs may race for a free port: only one creates it. One that takes
		// a reusable port from under another finds out at its next packet (hop
		// checks that the port is still its flow's).
		if (bpf_map_update_elem(&mesh_port_unsnat, &rk, &want, cur ? BPF_ANY : BPF_NOEXIST) < 0)
			continue;
		// The port's previous flow has ended: its entry goes, so the two maps
		// hold the same flows, and a late packet of it is dropped rather than
		// passed to the other plane.
		if (other) {
			bpf_map_delete_elem(&mesh_port_snat, &old);
			leave(&old, now, 1);
		}
		out->port = rk.dport;
		if (bpf_map_update_elem(&mesh_port_snat, fk, out, BPF_ANY) < 0) {
			bpf_map_delete_elem(&mesh_port_unsnat, &rk);
			return -1;
		}
		return 0;
	}
	return -1;
}

// The key of a hopped flow's bound port.
static __always_inline struct flow_key bound_key(const struct snat *s, __u8 proto)
{
	struct flow_key rk = {
		.saddr = s->task_ip,
		.daddr = s->ip,
		.sport = s->task_port,
		.dport = s->port,
		.proto = proto,
	};
	return rk;
}

// Whether the agent's route to the flow's task is still the one it left by.
static __always_inline int same_route(const struct snat *s)
{
	struct route *r = bpf_map_lookup_elem(&mesh_port_routes, &s->task_ip);
	return r && r->ifindex == s->ifindex && r->src == s->ip;
}

// Sends a packet of a flow whose task is on another host: from the bound port, to the
// task, out of the route's interface. TC_ACT_UNSPEC: left to the other plane.
static __always_inline int hop(const struct pkt *p, const struct headers *h,
			       const struct flow_key *fk, const struct port_backend *b, int inside)
{
	struct __sk_buff *skb = p->ctx;
	__u32 now = ticks();
	struct snat out;
	struct snat *s = bpf_map_lookup_elem(&mesh_port_snat, fk);
	// A flow has an entry in mesh_port_snat or a marker in mesh_port_left, never
	// both: a hopped packet looks up only the first.
	struct left *l = s ? 0 : bpf_map_lookup_elem(&mesh_port_left, fk);
	if (l) {
		// Not the kernel's: while the flow has packets (and for a while after)
		// it stays with the other plane, or is dropped if it lost its port.
		// Then a new flow from the same client (a SYN, a datagram) may bind.
		if (inside || now - l->seen < LEFT_FOR) {
			if (l->seen != now)
				l->seen = now;
			if (!l->drop || inside)
				return l->drop ? TC_ACT_SHOT : TC_ACT_UNSPEC;
		}
		bpf_map_delete_elem(&mesh_port_left, fk);
	}
	// A flow that picked again (its task left) is bound anew, and gives up the
	// port it had.
	if (s && (s->task_ip != b->ip || s->task_port != b->port) && !inside) {
		struct flow_key rk = bound_key(s, h->proto);
		struct unsnat *u = bpf_map_lookup_elem(&mesh_port_unsnat, &rk);
		if (u && owns(u, h))
			bpf_map_delete_elem(&mesh_port_unsnat, &rk);
		s = 0;
	}
	if (s) {
		out = *s;
		// Checked on every packet: once this flow ended or idled, its port may
		// have gone to another client, whose replies these are not.
		struct flow_key rk = bound_key(&out, h->proto);
		struct unsnat *u = bpf_map_lookup_elem(&mesh_port_unsnat, &rk);
		int lost = !u || !owns(u, h);
		if (!lost && !inside && s->seen != now && !same_route(&out)) {
			// The way to the task changed (an interface replaced, a route
			// moved): a new flow from this client binds by the new one.
			bpf_map_delete_elem(&mesh_port_unsnat, &rk);
			lost = 1;
		}
		if (lost) {
			bpf_map_delete_elem(&mesh_port_snat, fk);
			if (inside) {
				leave(fk, now, 1);
				return TC_ACT_SHOT;
			}
			s = 0;
		} else {
			if (u->seen != now)
				u->seen = now;
			if (s->seen != now)
				s->seen = now;
			if (h->opens)
				u->closed = 0;
			else if (h->ends)
				__sync_fetch_and_or(&u->closed,
						    h->ends == TCP_RST ? ENDED_BY_RST : FIN_FROM_CLIENT);
		}
	}
	if (!s) {
		// A connection this program did not bind is not its to take.
		if (inside)
			return TC_ACT_UNSPEC;
		if (bind_port(skb, h, fk, b, now, &out) < 0) {
			leave(fk, now, 0);
			return TC_ACT_UNSPEC;
		}
		count(b, h);
	}
	if (rewrite(p, h, 12, h->saddr, out.ip, 0, h->sport, out.port) < 0 ||
	    rewrite(p, h, 16, h->daddr, out.task_ip, 2, h->dport, out.task_port) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(out.ifindex, NULL, 0, 0);
}

// A task's reply to a flow hopped to it: from the published address and port, to the
// client, out of the interface the client came in on. TC_ACT_UNSPEC: not such a reply.
static __always_inline int unhop(const struct pkt *p, const struct headers *h)
{
	struct __sk_buff *skb = p->ctx;
	struct flow_key rk = key_of(h);
	struct unsnat *u = bpf_map_lookup_elem(&mesh_port_unsnat, &rk);
	if (!u || u->task_ifindex != skb->ifindex)
		return TC_ACT_UNSPEC;
	struct unsnat to = *u;
	__u32 now = ticks();
	if (to.seen != now)
		u->seen = now;
	if (h->ends == TCP_RST) {
		__sync_fetch_and_or(&u->closed, ENDED_BY_RST);
	} else if (h->ends) {
		__u32 was = __sync_fetch_and_or(&u->closed, FIN_FROM_TASK);
		if (!(was & (FIN_FROM_CLIENT | FIN_FROM_TASK)))
			__sync_fetch_and_or(&u->closed, TASK_CLOSED_FIRST);
	}
	if (rewrite(p, h, 12, h->saddr, to.published_ip, 0, h->sport, to.published_port) < 0 ||
	    rewrite(p, h, 16, h->daddr, to.client_ip, 2, h->dport, to.client_port) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(to.ifindex, NULL, 0, 0);
}

// Marks a packet whose destination address goes from `from` to `to` as taken, in
// its XDP metadata, where the tcx ingress program reads it. The bytes' sum changes by
// from - to: the IP checksum makes up for the address in the IP header, and the L4
// checksum for the port and for the address in the pseudo-header, which is not in
// the packet.
static __always_inline int mark_taken(struct xdp_md *ctx, __u32 from, __u32 to)
{
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct xdp_took)) < 0)
		return -1;
	void *meta = (void *)(long)ctx->data_meta;
	void *data = (void *)(long)ctx->data;
	if (meta + sizeof(struct xdp_took) > data)
		return -1;
	struct xdp_took *t = meta;
	t->magic = XDP_TOOK;
	t->csum_diff = fold((from & 0xffff) + (from >> 16) + (__u16)~(to & 0xffff) +
			    (__u16)~(to >> 16));
	return 0;
}

// Whether mesh_port_xdp already took this packet to its task: metadata of exactly
// its size and magic (another program's metadata is not ours). Its checksum change
// then goes into skb->csum, which bpf_csum_update does only for CHECKSUM_COMPLETE.
static __always_inline int taken_at_xdp(struct __sk_buff *skb)
{
	void *meta = (void *)(long)skb->data_meta;
	void *data = (void *)(long)skb->data;
	if (meta + sizeof(struct xdp_took) > data)
		return 0;
	// Exactly ours; hidden from the compiler, which would otherwise fold the two
	// tests into this one, from which the verifier learns no bound.
	long len = data - meta;
	asm volatile("" : "+r"(len));
	if (len != sizeof(struct xdp_took))
		return 0;
	struct xdp_took *t = meta;
	if (t->magic != XDP_TOOK)
		return 0;
	bpf_csum_update(skb, t->csum_diff);
	return 1;
}

// Whether the packet's L4 checksum is only the pseudo-header's sum, as a socket with
// checksum offload leaves it for the device to finish (CHECKSUM_PARTIAL, which XDP
// cannot see). XDP's update of a whole checksum would get it wrong, and whatever
// finishes it later (a device without offload, skb_checksum_help) would send a bad
// one, so such a packet is left to tcx, whose helpers know. A whole checksum that
// happens to equal it (1 in 65,536) only costs the shortcut.
static __always_inline int partial_csum(const struct pkt *p, const struct headers *h)
{
	__u16 check;
	if (h->tot_len == 0 || load(p, l4_csum_off(h), &check, 2) < 0)
		return 1;
	__u32 len = h->tot_len - (h->l4 - h->l3);
	__u32 sum = (h->saddr & 0xffff) + (h->saddr >> 16) + (h->daddr & 0xffff) +
		    (h->daddr >> 16) + bpf_htons((__u16)h->proto) + bpf_htons((__u16)len);
	return check == fold(sum);
}

// A client's packet for a published port of this host. TC_ACT_UNSPEC: left alone, or
// taken to a task of this host (DNAT) and sent on up the stack.
static __always_inline int forward(const struct pkt *p, const struct headers *h)
{
	struct port_key pk = { .port = h->dport, .proto = h->proto };
	struct port_frontend *fe = bpf_map_lookup_elem(&mesh_ports, &pk);
	if (!fe)
		return TC_ACT_UNSPEC;
	if (!bpf_map_lookup_elem(&mesh_host_addrs, &h->daddr))
		return TC_ACT_UNSPEC;
	struct flow_key fk = key_of(h);
	struct port_backend b;
	struct port_backend *was = bpf_map_lookup_elem(&mesh_port_flows, &fk);
	int inside = h->proto == IPPROTO_TCP && !h->opens;
	// Inside a TCP connection the flow keeps its task, even one that left the port:
	// a drained task finishes the connections it has, and a connection to a task
	// that is gone ends anyway. A connection this program did not open (one that
	// began before it was attached, or whose entry was evicted) is not its to take.
	// Otherwise a flow picks again once its task has left the port.
	struct snat *hopped;
	if (was && (inside || still_there(fe, was))) {
		b = *was;
	} else if (inside && (hopped = bpf_map_lookup_elem(&mesh_port_snat, &fk))) {
		// A hopped connection whose pick the LRU forgot: its task is the one it
		// was bound to.
		b.ip = hopped->task_ip;
		b.port = hopped->task_port;
		b.local = 0;
		b.pad = 0;
	} else {
		if (inside)
			return TC_ACT_UNSPEC;
		__u32 n = fe->count;
		if (n == 0 || n > MAX_SLOTS)
			return TC_ACT_UNSPEC;
		__u32 slot = flow_hash(h->saddr, h->sport, h->dport, h->proto) % RING;
		// The compiler knows slot < RING and drops a plain bound; the verifier
		// does not know it, so hide the value before checking.
		asm volatile("" : "+r"(slot));
		if (slot >= RING)
			return TC_ACT_UNSPEC;
		__u32 at = fe->ring[slot];
		asm volatile("" : "+r"(at));
		if (at >= MAX_SLOTS)
			return TC_ACT_UNSPEC;
		b = fe->backends[at];
		bpf_map_update_elem(&mesh_port_flows, &fk, &b, BPF_ANY);
		if (b.local)
			count(&b, h);
	}
	// XDP cannot hop (no bpf_redirect_neigh): the tcx program finds the pick in
	// mesh_port_flows and does it.
	if (!b.local)
		return p->xdp ? TC_ACT_UNSPEC : hop(p, h, &fk, &b, inside);
	struct flow_key rk = {
		.saddr = b.ip,
		.daddr = h->saddr,
		.sport = b.port,
		.dport = h->sport,
		.proto = h->proto,
	};
	struct nat back = { .ip = h->daddr, .port = h->dport };
	// Written when missing or different, not per packet: an LRU update takes a lock.
	// Two live flows cannot share a key (the task would see one 4-tuple for both),
	// so a different value is a stale entry, which the new flow replaces.
	struct nat *cur = bpf_map_lookup_elem(&mesh_port_revnat, &rk);
	if (!cur || cur->ip != back.ip || cur->port != back.port)
		bpf_map_update_elem(&mesh_port_revnat, &rk, &back, BPF_ANY);
	// Marked before the rewrite: a packet XDP cannot mark is left whole to tcx.
	if (p->xdp && (partial_csum(p, h) || mark_taken(p->ctx, h->daddr, b.ip) < 0))
		return TC_ACT_UNSPEC;
	if (rewrite(p, h, 16, h->daddr, b.ip, 2, h->dport, b.port) < 0)
		return TC_ACT_SHOT;
	if (p->xdp) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&mesh_port_xdp_took, &zero);
		if (n)
			*n += 1;
	}
	return TC_ACT_UNSPEC;
}

// Returning TC_ACT_UNSPEC (tcx's "next") lets the programs after this one run, tcx
// and legacy tc alike; a packet whose rewrite failed half-way is dropped.
SEC("classifier")
int mesh_port_ingress(struct __sk_buff *skb)
{
	struct pkt p = { .ctx = skb, .xdp = 0 };
	struct headers h = {};
	if (taken_at_xdp(skb) || !parse(&p, &h))
		return TC_ACT_UNSPEC;
	// A reply from another host's task is checked first: its destination is this
	// host's, but never a published port's flow.
	int verdict = unhop(&p, &h);
	if (verdict != TC_ACT_UNSPEC)
		return verdict;
	return forward(&p, &h);
}

SEC("classifier")
int mesh_port_egress(struct __sk_buff *skb)
{
	struct pkt p = { .ctx = skb, .xdp = 0 };
	struct headers h = {};
	if (!parse(&p, &h))
		return TC_ACT_UNSPEC;
	return reverse(&p, &h) < 0 ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

// The same rules at the XDP hook, for flows whose pick is a task on this host; the
// rest goes on to mesh_port_ingress (see the top of this file). "xdp.frags": a packet
// in several buffers (jumbo frames, or a GRO'd skb on veth) is read and written with
// the helpers, which handle them, so the program may run on any MTU.
SEC("xdp.frags")
int mesh_port_xdp(struct xdp_md *ctx)
{
	struct pkt p = { .ctx = ctx, .xdp = 1 };
	struct headers h = {};
	if (!parse(&p, &h))
		return XDP_PASS;
	// A reply from another host's task is tcx's to translate (unhop), even when its
	// bound port has since been published here.
	struct flow_key rk = key_of(&h);
	if (bpf_map_lookup_elem(&mesh_port_unsnat, &rk))
		return XDP_PASS;
	return forward(&p, &h) == TC_ACT_SHOT ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "Apache-2.0";
