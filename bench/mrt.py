#!/usr/bin/env python3
"""Writes an MRT TABLE_DUMP_V2 file (RFC 6396 §4.3) of N IPv4 /24 prefixes from one peer, for
`gobgp mrt inject global FILE`: gobgp's CLI adds one route per call, this loads 100,000 at once.

usage: mrt.py OUT N [FIRST_PREFIX] [PEER_IP] [PEER_AS] [ORIGIN_AS] [PAD]

PAD repeats the first PAD entries at the end: `gobgp mrt inject` (3.10) returns before its last
few hundred routes reach gobgpd, so the repeats (no-ops there) are what it drops."""
import ipaddress
import struct
import sys

TABLE_DUMP_V2 = 13
PEER_INDEX_TABLE, RIB_IPV4_UNICAST = 1, 2


def record(subtype, body):
    # MRT common header (§2): timestamp, type, subtype, length.
    return struct.pack("!IHHI", 0, TABLE_DUMP_V2, subtype, len(body)) + body


def attr(flags, code, value):
    if len(value) > 255:
        return struct.pack("!BBH", flags | 0x10, code, len(value)) + value
    return struct.pack("!BBB", flags, code, len(value)) + value


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    first = ipaddress.IPv4Address(sys.argv[3] if len(sys.argv) > 3 else "11.0.0.0")
    peer_ip = ipaddress.IPv4Address(sys.argv[4] if len(sys.argv) > 4 else "10.98.0.1")
    peer_as = int(sys.argv[5]) if len(sys.argv) > 5 else 65002
    origin_as = int(sys.argv[6]) if len(sys.argv) > 6 else 65100
    pad = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    if int(first) + n * 256 > 2**32:
        sys.exit("mrt.py: N /24s from FIRST_PREFIX run past 255.255.255.255: choose a lower FIRST_PREFIX")
    with open(out, "wb") as f:
        # PEER_INDEX_TABLE (§4.3.1): collector id, empty view name, one peer (type bit 1: AS4).
        f.write(record(PEER_INDEX_TABLE, peer_ip.packed + struct.pack("!HH", 0, 1)
                       + struct.pack("!B", 0x02) + peer_ip.packed + peer_ip.packed + struct.pack("!I", peer_as)))
        # Attributes of every entry: ORIGIN IGP, AS_PATH [origin_as] (4-octet ASNs in MRT, §4.3.4), NEXT_HOP.
        attrs = (attr(0x40, 1, b"\x00")
                 + attr(0x40, 2, struct.pack("!BBI", 2, 1, origin_as))
                 + attr(0x40, 3, peer_ip.packed))
        for i in list(range(n)) + list(range(min(pad, n))):
            p = (int(first) + i * 256).to_bytes(4, "big")[:3]
            entry = struct.pack("!HIH", 0, 0, len(attrs)) + attrs
            # RIB_IPV4_UNICAST (§4.3.2): sequence, prefix length, prefix, entry count, entries.
            f.write(record(RIB_IPV4_UNICAST, struct.pack("!IB", i, 24) + p + struct.pack("!H", 1) + entry))


if __name__ == "__main__":
    main()
