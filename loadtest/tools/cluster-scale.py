#!/usr/bin/env python3
"""What a catalogue of N products costs a 3-node cluster: memory per node, the new
leader's epoch start after kill -9 of the leader, and a restarted node's catch-up.

    python3 loadtest/tools/cluster-scale.py target/release/stockd 100000 [connections]

Starts three `stockd serve` nodes on loopback (free ports, a temporary directory), creates
N products through the leader (8 keep-alive connections unless told), prints each node's RSS, kills
the leader with SIGKILL, prints the new leader's "serving as the leader" elapsed_ms (the
blank entry, the committed state lent by the state machine and the supervisor's table
built from it, the supervisor started), restarts the
killed node and prints how long until it listens and until it has applied the whole log.
Every node is killed at the end, also on error. Loopback only.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read()


def status(port):
    try:
        code, body = get(port, "/v1/cluster")
        return json.loads(body) if code == 200 else None
    except OSError:
        return None


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    stockd, n = sys.argv[1], int(sys.argv[2])
    conns = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    tmp = tempfile.TemporaryDirectory()
    ports = free_ports(6)
    api = {i: ports[2 * (i - 1)] for i in (1, 2, 3)}
    raft = {i: ports[2 * (i - 1) + 1] for i in (1, 2, 3)}
    peers = ",".join(f"{i}=127.0.0.1:{api[i]}@127.0.0.1:{raft[i]}" for i in (1, 2, 3))
    env = dict(os.environ, STOCKD_CLUSTER_KEY="cluster-scale-key-0123456789", RUST_LOG="info")
    procs = {}

    def start(i):
        d = os.path.join(tmp.name, f"node{i}")
        log = open(os.path.join(tmp.name, f"node{i}.log"), "a")
        procs[i] = subprocess.Popen(
            [stockd, "serve", "--listen", f"127.0.0.1:{api[i]}", "--data-dir", f"{d}/data",
             "--snapshot-dir", f"{d}/snapshots", "--node-id", str(i), "--peers", peers],
            env=env, stdout=subprocess.DEVNULL, stderr=log)

    def wait(what, check, limit=120):
        deadline = time.time() + limit
        while time.time() < deadline:
            got = check()
            if got:
                return got
            time.sleep(0.02)
        raise SystemExit(f"timed out: {what}")

    try:
        for i in (1, 2, 3):
            start(i)
        leader = wait("a leader", lambda: next(
            (i for i in (1, 2, 3) if (s := status(api[i])) and s["role"] == "leader"), None))
        wait("the leader serves", lambda: get(api[leader], "/health?role=leader")[0] == 200)

        def create(t):
            c = http.client.HTTPConnection("127.0.0.1", api[leader], timeout=30)
            for k in range(t, n, conns):
                body = json.dumps({"sku": f"S-{k}", "name": "x", "on_hand": 100})
                c.request("POST", "/v1/products", body, {"content-type": "application/json"})
                r = c.getresponse()
                r.read()
                if r.status != 201:
                    raise SystemExit(f"create S-{k}: {r.status}")

        t0 = time.time()
        threads = [threading.Thread(target=create, args=(t,)) for t in range(conns)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(f"created {n} products in {time.time() - t0:.1f} s")
        last = status(api[leader])["last_seq"]
        wait("every node applied", lambda: all(
            (s := status(api[i])) and s["applied_seq"] >= last for i in (1, 2, 3)))
        for i in (1, 2, 3):
            role = "leader" if i == leader else "follower"
            print(f"node {i} ({role}): RSS {rss_mib(procs[i].pid):.0f} MiB")

        procs[leader].send_signal(signal.SIGKILL)
        procs[leader].wait()
        killed = time.time()
        others = [i for i in (1, 2, 3) if i != leader]
        new = wait("a new leader serves", lambda: next(
            (i for i in others if get(api[i], "/health?role=leader")[0] == 200), None))
        print(f"node {new} serves {time.time() - killed:.2f} s after kill -9 of node {leader}")
        log = open(os.path.join(tmp.name, f"node{new}.log")).read()
        began = re.findall(r"serving as the leader.*elapsed_ms=(\d+) blank_ms=(\d+) "
                           r"lent_ms=(\d+) actors_ms=(\d+)", log)[-1]
        total, blank, lent, actors = (int(x) for x in began)
        split = re.findall(r"the state machine lent its state.*lent_ms=(\d+) table_ms=(\d+)", log)
        if split:
            print(f"the state machine lent its state in {split[-1][0]} ms; the table took "
                  f"{split[-1][1]} ms")
        print(f"its epoch began in {total} ms: blank entry committed at {blank} ms, state "
              f"lent and its table built at {lent} ms, supervisor started at {actors} ms")

        t0 = time.time()
        start(leader)
        wait("the restarted node listens", lambda: status(api[leader]) is not None)
        listening = time.time() - t0
        target = status(api[new])["last_seq"]
        wait("the restarted node catches up", lambda: (s := status(api[leader])) and
             s["applied_seq"] >= target)
        print(f"node {leader} restarted: listening after {listening:.1f} s, "
              f"caught up after {time.time() - t0:.1f} s")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
