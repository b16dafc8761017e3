// SPDX-License-Identifier: GPL-2.0
/* IPIP (IP protocol 4, RFC 2003) made by tc programs, for kernels without the ipip module:
 * the packets a Linux ipip device (Calico's tunl0) would send and take.
 *
 *   weft_ipip_encap  egress of the tunnel device weft-ipip (one end of a NOARP veth pair:
 *                    the kernel routes remote pod subnets `via <node> dev weft-ipip onlink`,
 *                    so their packets leave through it). The node holding the
 *                    destination's subnet is looked up (longest prefix); an outer IPv4
 *                    header to it is put in front (bpf_skb_adjust_room, GSO kept) and the
 *                    packet leaves by bpf_redirect_neigh() out of the underlay device: the
 *                    FIB picks the next hop for the outer destination (the node itself, or
 *                    the router towards another segment).
 *   weft_ipip_decap  ingress of the underlay device, first: protocol 4 from a node holding
 *                    a lease, to this node's address, its inner source inside that node's
 *                    subnet -> the outer header goes and the packet enters through
 *                    weft-ipip as if the tunnel device had received it (routing and
 *                    rp_filter see the tunnel, as with tunl0). Any other protocol-4 packet is
 *                    dropped and counted; everything else goes on to the next program.
 *
 * Maps (pinned by name): weft_ipip_routes (LPM: remote pod subnet -> its node), weft_ipip_nodes
 * (node address -> its subnet), weft_ipip_config (this node's address, the devices),
 * weft_ipip_counters (per decision, per CPU).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <stdbool.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* Linux 6.3+ (newer than this system's uapi headers): the packet was encapsulated in IPv4;
 * clears the encapsulation marks, GSO (a GRO train) included. */
#define WEFT_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)

struct lpm_key {
	__u32 prefixlen;
	__u32 addr; /* network byte order */
};

struct node {
	__u32 subnet; /* network byte order */
	__u32 mask;
};

struct config {
	__u32 local;            /* this node's underlay address, network byte order */
	__u32 underlay_ifindex; /* where encapsulated packets leave */
	__u32 tunnel_ifindex;   /* weft-ipip: where decapsulated packets enter */
	__u8 tunnel_mac[6];     /* its MAC: what a packet it receives is addressed to */
	__u8 pad[2];
};

enum decision {
	I_ENCAP = 0,       /* encapsulated to a node */
	I_DECAP = 1,       /* decapsulated from a node */
	I_NO_NODE = 2,     /* into the tunnel, but no node holds the destination: dropped */
	I_STRANGER = 3,    /* protocol 4 from an address holding no lease: dropped */
	I_SPOOFED = 4,     /* from a node, inner source outside its subnet: dropped */
	I_NOT_OURS = 5,    /* protocol 4 to another address than ours: dropped */
	I_MALFORMED = 6,   /* protocol 4 too short, options, fragments, no inner IPv4: dropped */
	I_FAILED = 7,      /* a helper refused (room, redirect): dropped */
	I_MAX = 8,
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct lpm_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ipip_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct node);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ipip_nodes SEC(".maps");

/* Path MTU towards a node, as a router on the way said (ICMP fragmentation needed about an
 * IPIP packet of ours): the agent lowers the MTU of the routes through that node, so the
 * kernel tells pods (the job ip_tunnel's PMTU handling does for an ipip device). */
struct pmtu {
	__u32 mtu;
	__u32 pad;
	__u64 at; /* bpf_ktime_get_ns() */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct pmtu);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ipip_pmtu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ipip_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, I_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ipip_counters SEC(".maps");

static __always_inline int count(__u32 decision, int verdict)
{
	__u64 *n = bpf_map_lookup_elem(&weft_ipip_counters, &decision);

	if (n)
		*n += 1;
	return verdict;
}

/* The Internet checksum (RFC 1071) of a 20-byte IPv4 header. */
static __always_inline __u16 csum20(const __u16 *h)
{
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += h[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

SEC("classifier")
int weft_ipip_encap(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&weft_ipip_config, &zero);
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *inner = (void *)(eth + 1);
	struct iphdr outer = {};
	struct lpm_key k = { .prefixlen = 32 };
	__u32 *node;
	__u8 tos, ttl;

	/* Only IPv4 is routed into the tunnel; anything else (IPv6 neighbour discovery on the
	 * veth, say) has no business here. */
	if ((void *)(inner + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_SHOT;
	if (!cfg)
		return count(I_FAILED, TC_ACT_SHOT);
	k.addr = inner->daddr;
	node = bpf_map_lookup_elem(&weft_ipip_routes, &k);
	if (!node)
		return count(I_NO_NODE, TC_ACT_SHOT);
	/* The outer header as ip_tunnel_xmit() writes it for an ipip device with its defaults
	 * (ttl inherit, tos 0, pmtudisc): the inner TTL, DF, the inner ECN bits (CE as
	 * ECT(0), RFC 6040 normal mode), protocol 4. */
	tos = inner->tos & 3;
	ttl = inner->ttl;
	outer.version = 4;
	outer.ihl = 5;
	outer.tos = tos == 3 ? 2 : tos;
	outer.tot_len = bpf_htons(bpf_ntohs(inner->tot_len) + sizeof(outer));
	outer.id = 0;
	outer.frag_off = bpf_htons(0x4000);
	outer.ttl = ttl;
	outer.protocol = IPPROTO_IPIP;
	outer.saddr = cfg->local;
	outer.daddr = *node;
	outer.check = csum20((__u16 *)&outer);
	/* Room for it after the Ethernet header; a TSO train stays one (FIXED_GSO keeps the
	 * segment size: the inner MTU already leaves room for the 20 bytes). */
	if (bpf_skb_adjust_room(skb, sizeof(outer), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO))
		return count(I_FAILED, TC_ACT_SHOT);
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &outer, sizeof(outer), 0))
		return count(I_FAILED, TC_ACT_SHOT);
	count(I_ENCAP, 0);
	/* The FIB finds the next hop towards the node and the neighbour subsystem its MAC. */
	return bpf_redirect_neigh(cfg->underlay_ifindex, 0, 0, 0);
}

SEC("classifier")
int weft_ipip_decap(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&weft_ipip_config, &zero);
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer = (void *)(eth + 1);
	struct iphdr *inner = (void *)(outer + 1);
	struct node *n;
	__u32 saddr;

	if ((void *)(outer + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	/* ICMP fragmentation needed (RFC 1191) about an IPIP packet this node sent: the path
	 * to that node is smaller. Noted; the ICMP itself goes on to the stack. */
	if (outer->protocol == IPPROTO_ICMP && outer->ihl == 5 && cfg) {
		__u8 *icmp = (void *)(outer + 1);
		struct iphdr *quoted = (void *)(icmp + 8);

		if ((void *)(quoted + 1) <= end && icmp[0] == 3 && icmp[1] == 4 &&
		    quoted->protocol == IPPROTO_IPIP && quoted->saddr == cfg->local) {
			struct pmtu p = {
				.mtu = ((__u32)icmp[6] << 8) | icmp[7],
				.at = bpf_ktime_get_ns(),
			};
			__u32 node = quoted->daddr;

			/* 68: the least MTU IPv4 allows (RFC 791); less is noise. */
			if (p.mtu >= 68)
				bpf_map_update_elem(&weft_ipip_pmtu, &node, &p, BPF_ANY);
		}
		return TC_ACT_UNSPEC;
	}
	/* Not protocol 4: the next program, or the stack. */
	if (outer->protocol != IPPROTO_IPIP)
		return TC_ACT_UNSPEC;
	if (!cfg)
		return count(I_FAILED, TC_ACT_SHOT);
	/* Options, fragments (reassembly is the stack's), a truncated inner header. */
	if (outer->ihl != 5 || (outer->frag_off & bpf_htons(0x3fff)) ||
	    (void *)(inner + 1) > end || inner->version != 4)
		return count(I_MALFORMED, TC_ACT_SHOT);
	if (outer->daddr != cfg->local)
		return count(I_NOT_OURS, TC_ACT_SHOT);
	saddr = outer->saddr;
	n = bpf_map_lookup_elem(&weft_ipip_nodes, &saddr);
	if (!n)
		return count(I_STRANGER, TC_ACT_SHOT);
	if ((inner->saddr & n->mask) != n->subnet)
		return count(I_SPOOFED, TC_ACT_SHOT);
	/* FIXED_GSO: a GRO train keeps its segment size (else the kernel grows it by the 20
	 * bytes removed, and the segments no longer fit the pods' MTU). A kernel without the
	 * decap flag (before 6.3) still takes single packets. */
	if (bpf_skb_adjust_room(skb, -(int)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				WEFT_ADJ_ROOM_DECAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO) &&
	    bpf_skb_adjust_room(skb, -(int)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO))
		return count(I_FAILED, TC_ACT_SHOT);
	/* Addressed to the tunnel device, or its stack would take it for another host's. */
	if (bpf_skb_store_bytes(skb, 0, cfg->tunnel_mac, ETH_ALEN, 0))
		return count(I_FAILED, TC_ACT_SHOT);
	count(I_DECAP, 0);
	/* In through the tunnel device, as tunl0 would deliver it. */
	return bpf_redirect(cfg->tunnel_ifindex, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
