#!/usr/bin/env python3
"""ADD and DEL latency of weft-cni against the chain flannel delegates to (the reference
bridge + host-local plugins), in the same run, on the same node namespace, pods alternating.
Prints JSON lines. Usage: bench/cni.py WEFT_CNI_BINARY [PODS]"""
import json, os, statistics, subprocess, sys, tempfile, time

weft = sys.argv[1]
pods = int(sys.argv[2]) if len(sys.argv) > 2 else 100
tag = f"wb{os.getpid() % 100000}"
node = f"{tag}-node"
tmp = tempfile.mkdtemp()
made = []

def sh(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def netns(name):
    sh("ip", "netns", "add", name)
    made.append(name)

def plugin(binary, cmd, conf, cid, ns):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": cmd, "CNI_CONTAINERID": cid,
           "CNI_NETNS": f"/var/run/netns/{ns}", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    t = time.perf_counter()
    p = subprocess.run(["nsenter", f"--net=/var/run/netns/{node}", binary], input=json.dumps(conf).encode(),
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = (time.perf_counter() - t) * 1000
    if p.returncode != 0:
        raise SystemExit(f"{binary} {cmd} {cid}: {p.stdout.decode()} {p.stderr.decode()}")
    return dt

try:
    netns(node)
    with open(f"{tmp}/subnet.env", "w") as f:
        f.write("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    confs = {
        "weft-cni": (weft, {"cniVersion": "1.0.0", "name": "wbench", "type": "weft-cni",
                            "subnetFile": f"{tmp}/subnet.env", "dataDir": f"{tmp}/ipam"}),
        "bridge+host-local": ("/usr/lib/cni/bridge", {"cniVersion": "1.0.0", "name": "rbench", "type": "bridge",
                              "bridge": "cni1", "isDefaultGateway": True, "ipMasq": False, "hairpinMode": True, "mtu": 1450,
                              "ipam": {"type": "host-local", "subnet": "10.245.1.0/24", "dataDir": f"{tmp}/host-local"}}),
    }
    lat = {k: {"ADD": [], "DEL": []} for k in confs}
    for i in range(pods):
        for k in confs:
            netns(f"{tag}-{k[:4]}-{i}")
    for cmd in ("ADD", "DEL"):
        for i in range(pods):
            for k, (binary, conf) in confs.items():
                lat[k][cmd].append(plugin(binary, cmd, conf, f"{k[:4]}{i}", f"{tag}-{k[:4]}-{i}"))
    for cmd in ("ADD", "DEL"):
        res = {}
        for k in confs:
            v = sorted(lat[k][cmd])
            res[k] = (statistics.median(v), v[int(round(0.99 * (len(v) - 1)))])
            print(json.dumps({"bench": f"cni-{cmd.lower()}", "plugin": k, "pods": pods,
                              "median_ms": round(res[k][0], 2), "p99_ms": round(res[k][1], 2)}))
        print(json.dumps({"bench": f"cni-{cmd.lower()}", "ratio_median_weft_to_reference":
                          round(res["weft-cni"][0] / res["bridge+host-local"][0], 3)}))
finally:
    for n in reversed(made):
        subprocess.run(["ip", "netns", "del", n], stderr=subprocess.DEVNULL)
    subprocess.run(["rm", "-rf", tmp])
