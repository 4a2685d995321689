// SPDX-License-Identifier: Apache-2.0
//
// Socket-level balancing of service VIPs, in the manner of Cilium's kube-proxy
// replacement: a connect() (or an unconnected sendto()) to VIP:port is rewritten to a
// task's address before the kernel routes anything, so there is no NAT and no
// per-packet work afterwards. Replies to unconnected UDP sockets, and getpeername(),
// are rewritten back to the VIP, so the application only ever sees the VIP.
//
// Addresses are kept in one 16-byte form for both families: an IPv4 address is
// ::ffff:a.b.c.d, which is also what an IPv6 socket sees when it talks to an IPv4
// address, so one frontend entry serves both kinds of socket. Every address and port
// in a map is in network byte order, as the kernel hands them over.
//
// The maps are filled by the agent (mesh-ebpf/src/maps.rs mirrors these layouts).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define ECONNREFUSED 111

// The most tasks one frontend balances over. The agent reports a frontend with more
// and balances over the first ones.
#define MAX_SLOTS 256

struct addr {
	__u32 w[4];
};

struct frontend_key {
	struct addr ip;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

// A frontend's whole backend set lives in its one value, so the agent switches a set
// with one map update: a program sees the old set or the new one, never a mix.
struct frontend {
	__u32 count;
	// Round robin position, advanced atomically; it restarts when the set changes.
	__u32 cursor;
	__u32 backends[MAX_SLOTS];
};

struct backend {
	struct addr ip;
	__u16 port;
	__u16 pad;
};

// A socket's choice for a VIP, so that the datagrams of one unconnected UDP socket
// stay with one task for as long as that task stays in the set.
struct flow_key {
	__u64 cookie;
	struct addr ip;
	__u16 port;
	__u8 proto;
	__u8 pad[5];
};

// Which VIP a socket's peer stands for: written at connect and sendmsg, read by
// recvmsg and getpeername.
struct revnat_key {
	__u64 cookie;
	struct addr ip;
	__u16 port;
	__u16 pad[3];
};

struct revnat {
	struct addr ip;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct frontend_key);
	__type(value, struct frontend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct revnat_key);
	__type(value, struct revnat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_revnat SEC(".maps");

// New connections and new UDP flows per backend id, per CPU.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_picks SEC(".maps");

static __always_inline void v4_mapped(struct addr *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = ip4;
}

static __always_inline int is_v4_mapped(const struct addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline int has_slot(const struct frontend *fe, __u32 id)
{
	__u32 n = fe->count;
	for (__u32 i = 0; i < MAX_SLOTS; i++) {
		if (i >= n)
			break;
		if (fe->backends[i] == id)
			return 1;
	}
	return 0;
}

// The next backend in round robin order. A backend id whose entry is gone (the agent
// removes it just after switching the set) is skipped once.
static __always_inline struct backend *pick(struct frontend *fe, __u32 *id)
{
	__u32 n = fe->count;
	if (n == 0 || n > MAX_SLOTS)
		return 0;
	__u32 at = __sync_fetch_and_add(&fe->cursor, 1);
	for (int tries = 0; tries < 2; tries++) {
		__u32 slot = (at + tries) % n;
		// The compiler knows slot < n <= MAX_SLOTS and would drop a plain bound;
		// the verifier does not know it, so hide the value and mask it.
		asm volatile("" : "+r"(slot));
		slot &= MAX_SLOTS - 1;
		*id = fe->backends[slot];
		struct backend *b = bpf_map_lookup_elem(&mesh_backends, id);
		if (b)
			return b;
	}
	return 0;
}

static __always_inline void count(__u32 id)
{
	__u64 *n = bpf_map_lookup_elem(&mesh_picks, &id);
	if (n)
		*n += 1;
}

// Balances a connect or sendmsg to key. Returns 1 to let the call go on (with the
// address rewritten when key is a VIP), 0 to fail it (a VIP with no task).
static __always_inline int balance(struct bpf_sock_addr *ctx, struct frontend_key *key,
				   int sticky, struct backend **out)
{
	*out = 0;
	struct frontend *fe = bpf_map_lookup_elem(&mesh_frontends, key);
	if (!fe)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct backend *b = 0;
	__u32 id = 0;
	struct flow_key fk = {};
	if (sticky) {
		fk.cookie = cookie;
		fk.ip = key->ip;
		fk.port = key->port;
		fk.proto = key->proto;
		__u32 *was = bpf_map_lookup_elem(&mesh_flows, &fk);
		if (was && has_slot(fe, *was)) {
			id = *was;
			b = bpf_map_lookup_elem(&mesh_backends, &id);
		}
	}
	if (!b) {
		b = pick(fe, &id);
		if (!b) {
			bpf_set_retval(-ECONNREFUSED);
			return 0;
		}
		count(id);
		if (sticky)
			bpf_map_update_elem(&mesh_flows, &fk, &id, BPF_ANY);
	}
	struct revnat_key rk = {};
	rk.cookie = cookie;
	rk.ip = b->ip;
	rk.port = b->port;
	struct revnat rv = {};
	rv.ip = key->ip;
	rv.port = key->port;
	bpf_map_update_elem(&mesh_revnat, &rk, &rv, BPF_ANY);
	*out = b;
	return 1;
}

static __always_inline int forward4(struct bpf_sock_addr *ctx, int sticky)
{
	struct frontend_key key = {};
	v4_mapped(&key.ip, ctx->user_ip4);
	key.port = (__u16)ctx->user_port;
	key.proto = ctx->protocol;
	struct backend *b;
	if (!balance(ctx, &key, sticky, &b))
		return 0;
	// An IPv4 socket cannot reach an IPv6 task; the agent gives IPv4 VIPs IPv4 tasks.
	if (b && is_v4_mapped(&b->ip)) {
		ctx->user_ip4 = b->ip.w[3];
		ctx->user_port = b->port;
	}
	return 1;
}

static __always_inline int forward6(struct bpf_sock_addr *ctx, int sticky)
{
	struct frontend_key key = {};
	key.ip.w[0] = ctx->user_ip6[0];
	key.ip.w[1] = ctx->user_ip6[1];
	key.ip.w[2] = ctx->user_ip6[2];
	key.ip.w[3] = ctx->user_ip6[3];
	key.port = (__u16)ctx->user_port;
	key.proto = ctx->protocol;
	struct backend *b;
	if (!balance(ctx, &key, sticky, &b))
		return 0;
	if (b) {
		ctx->user_ip6[0] = b->ip.w[0];
		ctx->user_ip6[1] = b->ip.w[1];
		ctx->user_ip6[2] = b->ip.w[2];
		ctx->user_ip6[3] = b->ip.w[3];
		ctx->user_port = b->port;
	}
	return 1;
}

// The peer a socket sees: a task's address becomes the VIP it was reached through.
static __always_inline void reverse4(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	v4_mapped(&rk.ip, ctx->user_ip4);
	rk.port = (__u16)ctx->user_port;
	struct revnat *rv = bpf_map_lookup_elem(&mesh_revnat, &rk);
	if (rv && is_v4_mapped(&rv->ip)) {
		ctx->user_ip4 = rv->ip.w[3];
		ctx->user_port = rv->port;
	}
}

static __always_inline void reverse6(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.ip.w[0] = ctx->user_ip6[0];
	rk.ip.w[1] = ctx->user_ip6[1];
	rk.ip.w[2] = ctx->user_ip6[2];
	rk.ip.w[3] = ctx->user_ip6[3];
	rk.port = (__u16)ctx->user_port;
	struct revnat *rv = bpf_map_lookup_elem(&mesh_revnat, &rk);
	if (rv) {
		ctx->user_ip6[0] = rv->ip.w[0];
		ctx->user_ip6[1] = rv->ip.w[1];
		ctx->user_ip6[2] = rv->ip.w[2];
		ctx->user_ip6[3] = rv->ip.w[3];
		ctx->user_port = rv->port;
	}
}

SEC("cgroup/connect4")
int mesh_connect4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, 0);
}

SEC("cgroup/connect6")
int mesh_connect6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, 0);
}

SEC("cgroup/sendmsg4")
int mesh_sendmsg4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, 1);
}

SEC("cgroup/sendmsg6")
int mesh_sendmsg6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, 1);
}

SEC("cgroup/recvmsg4")
int mesh_recvmsg4(struct bpf_sock_addr *ctx)
{
	reverse4(ctx);
	return 1;
}

SEC("cgroup/recvmsg6")
int mesh_recvmsg6(struct bpf_sock_addr *ctx)
{
	reverse6(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int mesh_getpeername4(struct bpf_sock_addr *ctx)
{
	reverse4(ctx);
	return 1;
}

SEC("cgroup/getpeername6")
int mesh_getpeername6(struct bpf_sock_addr *ctx)
{
	reverse6(ctx);
	return 1;
}

char LICENSE[] SEC("license") = "Apache-2.0";
