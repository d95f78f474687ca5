"""Checks, from Open MPI's verbose output (--mca btl_base_verbose 100) of a
run on the emulated cluster, which transport carried each pair of ranks:
TCP over the cluster's veth addresses between nodes, shared memory (vader)
within a node, and nothing over loopback or the host's own interfaces.

usage: check_transports.py LOG RECORD.h5 SUBNET_PREFIX HOST=ADDRESS ...

RECORD.h5's `hostnames` attribute says on which node each rank ran; each
HOST=ADDRESS names a node's address on the cluster subnet (SUBNET_PREFIX is
its first three octets, e.g. 10.213.15). Exits 1 naming every violation.
"""
import re
import sys

import h5py

PREFIX = r"^\[(?P<host>[^:\]]+):(?P<pid>\d+)\] "
USING = re.compile(PREFIX + r"mca: bml: Using (?P<btl>\w+) btl for send to "
                   r"\[\[\d+,\d+\],(?P<rank>\d+)\] on node \S+$")
CONNECTED = re.compile(PREFIX + r"btl:tcp: now connected to (?P<address>\S+), "
                       r"process \[\[\d+,\d+\],(?P<rank>\d+)\]$")
CONNECTING = re.compile(PREFIX + r"btl: tcp: attempting to connect\(\) to "
                        r"\[\[\d+,\d+\],(?P<rank>\d+)\] address (?P<address>\S+) on port \d+$")
INTERFACE = re.compile(PREFIX + r"btl:tcp: examining interface (?P<interface>\S+)$")


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    log_path, record_path, subnet = sys.argv[1:4]
    node_address = dict(arg.split("=", 1) for arg in sys.argv[4:])
    with h5py.File(record_path, "r") as f:
        rank_host = [h.decode() if isinstance(h, bytes) else str(h) for h in f.attrs["hostnames"]]
    world = len(rank_host)
    lines = open(log_path, encoding="utf-8", errors="replace").read().splitlines()

    errors = []
    # The sender's rank is not in the line, only its host and pid: count per
    # (sender host, target rank) and compare with what the placement implies.
    used = {}
    for line in lines:
        m = USING.match(line)
        if m:
            used.setdefault((m["host"], int(m["rank"])), []).append(m["btl"])
    for sender in range(world):
        for target in range(world):
            if sender == target:
                continue
            want = "vader" if rank_host[sender] == rank_host[target] else "tcp"
            btls = used.get((rank_host[sender], target), [])
            if want not in btls:
                errors.append(f"no 'Using {want} btl' from a rank on {rank_host[sender]} "
                              f"to rank {target} (on {rank_host[target]}): saw {btls}")
    for (host, target), btls in used.items():
        for btl in btls:
            same = host == rank_host[target]
            if btl == "tcp" and same:
                errors.append(f"tcp used between ranks on the same node {host} (to rank {target})")
            if btl == "vader" and not same:
                errors.append(f"vader used from {host} to rank {target} on {rank_host[target]}")
            if btl not in ("tcp", "vader", "self"):
                errors.append(f"unexpected btl {btl} from {host} to rank {target}")

    connected = 0
    for line in lines:
        m = CONNECTED.match(line) or CONNECTING.match(line)
        if m:
            target_host = rank_host[int(m["rank"])]
            if m["address"] != node_address.get(target_host):
                errors.append(f"TCP to rank {m['rank']} on {target_host} went to {m['address']}, "
                              f"not its veth address {node_address.get(target_host)}: {line}")
            if m["host"] == target_host:
                errors.append(f"TCP connection within node {m['host']}: {line}")
            connected += CONNECTED.match(line) is not None
        m = INTERFACE.match(line)
        if m and not m["interface"].startswith("moesim-"):
            errors.append(f"the tcp btl examined interface {m['interface']}: {line}")
        if re.search(r"\b(127\.\d+\.\d+\.\d+|::1)\b", line) and "btl" in line:
            errors.append(f"loopback address in the btl output: {line}")
    pairs = sum(rank_host[a] != rank_host[b] for a in range(world) for b in range(world))
    if connected < pairs // 2:
        errors.append(f"only {connected} 'now connected' TCP lines for {pairs // 2} node-crossing pairs")
    if not any(line.startswith("[") and f"Found match: " in line and subnet + "." in line
               for line in lines):
        errors.append(f"no tcp btl 'Found match' on the cluster subnet {subnet}.0/24")

    if errors:
        print("check_transports: " + "\n  ".join(errors))
        sys.exit(1)
    vader = sum(b.count("vader") for b in used.values())
    tcp = sum(b.count("tcp") for b in used.values())
    print(f"check_transports: ranks on {','.join(rank_host)}: {tcp} rank pairs over tcp "
          f"({connected} connections, all to veth addresses on {subnet}.0/24), "
          f"{vader} over vader within a node")


if __name__ == "__main__":
    main()
