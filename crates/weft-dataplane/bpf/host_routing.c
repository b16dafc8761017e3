// SPDX-License-Identifier: GPL-2.0
/* eBPF host routing (Cilium's "host-routing: BPF"): routed pods' packets skip the host's
 * IP stack and netfilter. Two tc programs:
 *
 *   weft_from_pod  ingress of each pod's host-side veth (what the pod sends):
 *                  a local pod -> bpf_redirect_peer() straight into its namespace;
 *   weft_from_netkit  the same for a netkit pod, attached as BPF_NETKIT_PEER: it runs in
 *                  the pod's own transmit path (no backlog queue between pod and wire);
 *                  a local pod -> bpf_redirect() to its device's egress (redirect_peer
 *                  works at tc ingress only);
 *                  a remote pod -> bpf_fib_lookup(), then bpf_redirect_neigh() out of the
 *                  FIB's device to the FIB's next hop (underlay, or the VTEP);
 *                  anything else -> the stack (TC_ACT_OK), never dropped here.
 *   weft_to_pod    ingress of the underlay device and the VTEP (what other nodes send):
 *                  a local pod -> bpf_redirect_peer(); anything else -> the stack.
 *
 * Maps (pinned by name under the agent's bpffs directory, so a restarted or upgraded agent
 * finds them and traffic never stops): weft_endpoints (pod IPv4 -> host-side ifindex, pod
 * MAC, host-side MAC; written by weft-cni, reconciled by the agent), weft_config (the
 * cluster network, the monitor switch), weft_counters (per decision, per CPU), weft_events
 * (trace events for `weft monitor`, written only while it runs).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <stdbool.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

struct endpoint {
	__u32 ifindex;     /* host-side veth */
	__u8 mac[6];       /* the pod's eth0 */
	__u8 node_mac[6];  /* the host-side veth's */
};

struct config {
	__u32 network;  /* cluster network, network byte order */
	__u32 mask;     /* its netmask, network byte order; zero: no IPv4 (IPv6-only cluster) */
	__u32 monitor;  /* non-zero while `weft monitor` reads weft_events */
	__u32 attach;   /* for weft-cni: 0 TCX links, 1 tc clsact filters (programs ignore it) */
};

/* Why a packet went where it went; the index of weft_counters, the `decision` of an event.
 * Keep in step with weft_dataplane::bpf::Decision. */
enum decision {
	D_PEER_LOCAL = 0,  /* pod -> pod on this node: redirect_peer */
	D_NEIGH = 1,       /* pod -> pod on another node: redirect_neigh */
	D_PEER_WIRE = 2,   /* wire/VTEP -> pod on this node: redirect_peer */
	D_NOT_IPV4 = 3,    /* ARP, IPv6, short frames: the stack */
	D_OUTSIDE = 4,     /* destination outside the cluster network (ip-masq applies) */
	D_HOST = 5,        /* for this node itself (FIB: not forwarded) */
	D_FIB_FAIL = 6,    /* no route, unreachable, blackhole, ...: the stack answers */
	D_FRAG_NEEDED = 7, /* larger than the route's MTU: the stack sends ICMP frag-needed */
	D_TTL = 8,         /* TTL would expire: the stack sends ICMP time-exceeded */
	D_OPTIONS = 9,     /* IPv4 options: the stack handles them */
	D_NOT_LOCAL = 10,  /* wire/VTEP: not for a local pod */
	D_MAX = 11,
};

struct event {
	__u32 ifindex;  /* where the program ran */
	__u32 saddr;
	__u32 daddr;
	__u32 target;   /* the ifindex redirected to (0: the stack) */
	__u16 len;
	__u8 decision;
	__u8 hook;      /* 0: from a pod, 1: from the wire or VTEP */
	__u8 protocol;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_config SEC(".maps");

/* IPv6 (dual stack): pods by their IPv6 address, and the cluster's IPv6 network. Maps of
 * their own, so an agent upgraded from an IPv4-only one takes the pinned maps over as
 * they are. */
struct ip6 {
	__u32 a[4];
};

struct config6 {
	struct ip6 network; /* network byte order; all zero: IPv6 is off */
	struct ip6 mask;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ip6);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_endpoints6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_config6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, D_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_events SEC(".maps");

static __always_inline int account(struct __sk_buff *skb, const struct config *cfg,
				   struct iphdr *ip, __u32 decision, __u32 target, __u8 hook,
				   int verdict)
{
	__u32 k = decision;
	__u64 *n = bpf_map_lookup_elem(&weft_counters, &k);

	if (n)
		*n += 1;
	/* Tracing costs one load and a branch while nobody watches. */
	if (cfg && cfg->monitor) {
		struct event e = {
			.ifindex = skb->ifindex,
			.saddr = ip ? ip->saddr : 0,
			.daddr = ip ? ip->daddr : 0,
			.target = target,
			.len = skb->len,
			.decision = decision,
			.hook = hook,
			.protocol = ip ? ip->protocol : 0,
		};
		bpf_ringbuf_output(&weft_events, &e, sizeof(e), 0);
	}
	return verdict;
}

/* RFC 1624 incremental update of the header checksum for TTL - 1 (the kernel's
 * ip_decrease_ttl). */
static __always_inline void dec_ttl(struct iphdr *ip)
{
	__u32 check = (__u32)ip->check;

	check += (__u32)bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

/* Into a local pod's namespace: Ethernet addresses as the pod expects them from its
 * gateway, TTL as a router leaves it. From tc ingress straight to the pod's side
 * (redirect_peer); from a netkit pod's transmit path to the egress of the other pod's
 * host-side device, which hands it over (redirect_peer is refused outside tc ingress). */
static __always_inline int to_local(struct __sk_buff *skb, const struct config *cfg,
				    struct ethhdr *eth, struct iphdr *ip,
				    const struct endpoint *ep, __u32 decision, __u8 hook,
				    const bool netkit)
{
	__builtin_memcpy(eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->node_mac, ETH_ALEN);
	dec_ttl(ip);
	account(skb, cfg, ip, decision, ep->ifindex, hook, 0);
	if (netkit)
		return bpf_redirect(ep->ifindex, 0);
	return bpf_redirect_peer(ep->ifindex, 0);
}

/* The Ethernet and IPv4 headers, or NULL for anything else (not IPv4, or too short to
 * tell: the stack's business). */
static __always_inline struct iphdr *ipv4(struct __sk_buff *skb, struct ethhdr **eth)
{
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip;

	*eth = (void *)(long)skb->data;
	ip = (void *)(*eth + 1);
	if ((void *)(ip + 1) > end || (*eth)->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	return ip;
}

static __always_inline struct config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&weft_config, &zero);
}

/* What a pod sends. skb->ifindex is the host-side device in both hooks (tc ingress of a
 * veth; netkit runs its peer programs with skb->dev already the primary). */
static __always_inline int from_pod6(struct __sk_buff *skb, const bool netkit);

static __always_inline int from_pod(struct __sk_buff *skb, const bool netkit)
{
	struct ethhdr *eth;
	struct iphdr *ip = ipv4(skb, &eth);
	struct config *cfg = config();
	struct endpoint *ep;
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	int rc;

	if (!ip) {
		if (skb->protocol == bpf_htons(ETH_P_IPV6))
			return from_pod6(skb, netkit);
		return account(skb, cfg, 0, D_NOT_IPV4, 0, 0, TC_ACT_OK);
	}
	if (!cfg)
		return account(skb, cfg, ip, D_FIB_FAIL, 0, 0, TC_ACT_OK);
	/* Outside the cluster network (or no IPv4 network at all): the stack routes it, and
	 * ip-masq's rule applies. */
	if (!cfg->mask || (ip->daddr & cfg->mask) != cfg->network)
		return account(skb, cfg, ip, D_OUTSIDE, 0, 0, TC_ACT_OK);
	/* Options would need the stack's processing; TTL 1 needs its ICMP. */
	if (ip->ihl != 5)
		return account(skb, cfg, ip, D_OPTIONS, 0, 0, TC_ACT_OK);
	if (ip->ttl <= 1)
		return account(skb, cfg, ip, D_TTL, 0, 0, TC_ACT_OK);
	/* A pod on this node: straight into its namespace. */
	ep = bpf_map_lookup_elem(&weft_endpoints, &ip->daddr);
	if (ep)
		return to_local(skb, cfg, eth, ip, ep, D_PEER_LOCAL, 0, netkit);

	/* Another node's pod: the FIB picks the device and next hop (underlay for host-gw and
	 * bgp, the VTEP for vxlan), with the packet's length so an MTU too small shows. */
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		/* The kernel resolves (or reuses) the neighbour of the next hop and fills in the
		 * Ethernet header: no stale MAC of ours. */
		nh.nh_family = AF_INET;
		nh.ipv4_nh = fib.ipv4_dst;
		dec_ttl(ip);
		account(skb, cfg, ip, D_NEIGH, fib.ifindex, 0, 0);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		/* The stack sends the pod ICMP frag-needed (path MTU discovery keeps working). */
		return account(skb, cfg, ip, D_FRAG_NEEDED, 0, 0, TC_ACT_OK);
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		/* For this node: local delivery is the stack's. */
		return account(skb, cfg, ip, D_HOST, 0, 0, TC_ACT_OK);
	default:
		/* No route, blackhole, unreachable, prohibited: the stack answers the pod. */
		return account(skb, cfg, ip, D_FIB_FAIL, 0, 0, TC_ACT_OK);
	}
}

/* ---- IPv6: the same decisions, by the same rules. ---- */

static __always_inline struct ipv6hdr *ipv6(struct __sk_buff *skb, struct ethhdr **eth)
{
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6;

	*eth = (void *)(long)skb->data;
	ip6 = (void *)(*eth + 1);
	if ((void *)(ip6 + 1) > end || (*eth)->h_proto != bpf_htons(ETH_P_IPV6))
		return 0;
	return ip6;
}

static __always_inline struct config6 *config6(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&weft_config6, &zero);
}

/* Inside the cluster's IPv6 network (and IPv6 on at all: the network's mask is not zero). */
static __always_inline bool in_network6(const struct config6 *c, const struct ip6 *a)
{
	if (!(c->mask.a[0] | c->mask.a[1] | c->mask.a[2] | c->mask.a[3]))
		return false;
	return (a->a[0] & c->mask.a[0]) == c->network.a[0] &&
	       (a->a[1] & c->mask.a[1]) == c->network.a[1] &&
	       (a->a[2] & c->mask.a[2]) == c->network.a[2] &&
	       (a->a[3] & c->mask.a[3]) == c->network.a[3];
}

/* Into a local pod, as to_local does for IPv4 (IPv6 has no header checksum to mend). */
static __always_inline int to_local6(struct __sk_buff *skb, const struct config *cfg,
				     struct ethhdr *eth, struct ipv6hdr *ip6,
				     const struct endpoint *ep, __u32 decision, __u8 hook,
				     const bool netkit)
{
	__builtin_memcpy(eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->node_mac, ETH_ALEN);
	ip6->hop_limit--;
	account(skb, cfg, 0, decision, ep->ifindex, hook, 0);
	if (netkit)
		return bpf_redirect(ep->ifindex, 0);
	return bpf_redirect_peer(ep->ifindex, 0);
}

static __always_inline int from_pod6(struct __sk_buff *skb, const bool netkit)
{
	struct ethhdr *eth;
	struct ipv6hdr *ip6 = ipv6(skb, &eth);
	struct config *cfg = config();
	struct config6 *c6 = config6();
	struct ip6 dst;
	struct endpoint *ep;
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	int rc;

	if (!ip6 || !c6)
		return account(skb, cfg, 0, D_NOT_IPV4, 0, 0, TC_ACT_OK);
	__builtin_memcpy(&dst, &ip6->daddr, sizeof(dst));
	/* Outside the cluster network, link-local, multicast (neighbour discovery): the stack. */
	if (!in_network6(c6, &dst))
		return account(skb, cfg, 0, D_OUTSIDE, 0, 0, TC_ACT_OK);
	/* Hop limit 1 needs the stack's ICMPv6 time exceeded. */
	if (ip6->hop_limit <= 1)
		return account(skb, cfg, 0, D_TTL, 0, 0, TC_ACT_OK);
	ep = bpf_map_lookup_elem(&weft_endpoints6, &dst);
	if (ep)
		return to_local6(skb, cfg, eth, ip6, ep, D_PEER_LOCAL, 0, netkit);
	fib.family = AF_INET6;
	fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0FFFFFFF);
	fib.l4_protocol = ip6->nexthdr;
	fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		nh.nh_family = AF_INET6;
		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
		ip6->hop_limit--;
		account(skb, cfg, 0, D_NEIGH, fib.ifindex, 0, 0);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		/* The stack sends the pod ICMPv6 Packet Too Big. */
		return account(skb, cfg, 0, D_FRAG_NEEDED, 0, 0, TC_ACT_OK);
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		return account(skb, cfg, 0, D_HOST, 0, 0, TC_ACT_OK);
	default:
		return account(skb, cfg, 0, D_FIB_FAIL, 0, 0, TC_ACT_OK);
	}
}

static __always_inline int to_pod6(struct __sk_buff *skb)
{
	struct ethhdr *eth;
	struct ipv6hdr *ip6 = ipv6(skb, &eth);
	struct config *cfg = config();
	struct ip6 dst;
	struct endpoint *ep;

	if (!ip6)
		return account(skb, cfg, 0, D_NOT_IPV4, 0, 1, TC_ACT_OK);
	__builtin_memcpy(&dst, &ip6->daddr, sizeof(dst));
	ep = bpf_map_lookup_elem(&weft_endpoints6, &dst);
	if (!ep)
		return account(skb, cfg, 0, D_NOT_LOCAL, 0, 1, TC_ACT_OK);
	if (ip6->hop_limit <= 1)
		return account(skb, cfg, 0, D_TTL, 0, 1, TC_ACT_OK);
	return to_local6(skb, cfg, eth, ip6, ep, D_PEER_WIRE, 1, false);
}

SEC("classifier")
int weft_from_pod(struct __sk_buff *skb)
{
	return from_pod(skb, false);
}

SEC("classifier")
int weft_from_netkit(struct __sk_buff *skb)
{
	return from_pod(skb, true);
}

SEC("classifier")
int weft_to_pod(struct __sk_buff *skb)
{
	struct ethhdr *eth;
	struct iphdr *ip = ipv4(skb, &eth);
	struct config *cfg = config();
	struct endpoint *ep;

	if (!ip) {
		if (skb->protocol == bpf_htons(ETH_P_IPV6))
			return to_pod6(skb);
		return account(skb, cfg, 0, D_NOT_IPV4, 0, 1, TC_ACT_OK);
	}
	ep = bpf_map_lookup_elem(&weft_endpoints, &ip->daddr);
	/* Not a pod of this node (the node itself, encapsulated traffic, ...): the stack. */
	if (!ep)
		return account(skb, cfg, ip, D_NOT_LOCAL, 0, 1, TC_ACT_OK);
	if (ip->ihl != 5)
		return account(skb, cfg, ip, D_OPTIONS, 0, 1, TC_ACT_OK);
	if (ip->ttl <= 1)
		return account(skb, cfg, ip, D_TTL, 0, 1, TC_ACT_OK);
	return to_local(skb, cfg, eth, ip, ep, D_PEER_WIRE, 1, false);
}

char _license[] SEC("license") = "GPL";
