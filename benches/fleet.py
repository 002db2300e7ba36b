#!/usr/bin/env python3
"""Fleet accuracy on slices (issue 23): four gateways on one Redis share a key limited to
200 calls a second with a burst of 20, offered 800 calls a second in all for `--seconds`:

  even     200 a second to each gateway;
  skewed   90% to one gateway, 10% to another;
  shift    all to gateway 1 for the first half, then all to gateway 2.

For each it reports what the fleet admitted against `burst + rate x t` (never above), the
most admitted in any one second against `burst + rate`, the utilisation, the admitted per
second, the Redis scripts per call, and, for `shift`, how long the new gateway's refusals
last after the load moves (what another gateway's slices hold, which must be back within
a second).

Usage: benches/fleet.py [--seconds 10] [--rate 800] [--gateways 4] [--limit 200 --burst 20]
(`--limit 100000 --burst 100000`: a limit that never binds, to see what calls cost Redis
when the slices decide them all.)
Needs a release build (`cargo build --release`), nginx and redis-server (load.py installs
what is missing). Gateways run on core 0, Redis, the worker and the load on core 1.
"""

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load import (AGENT, KEY, PROXY_CPU, ROOT, commandstats, cpu_seconds, ensure_tools,  # noqa: E402
                  free_port, logged, metric_sum, redis_server, stop, upstream, wait_port)

RATE, BURST = 200, 20


def write_config(tmp, name, worker_port, port, admin_port, redis_port):
    """A one-thread gateway on the shared Redis; the key limited, the agent free."""
    os.makedirs(os.path.join(tmp, "policies"), exist_ok=True)
    with open(os.path.join(tmp, "policies", "fleet.yaml"), "w") as f:
        f.write(f"policies:\n  fleet:\n    requests: {{rate: {RATE}, per: 1s, burst: {BURST}}}\n")
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(f"""threads: 1
upstreams:
  pool: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/invoke"}}
agents:
  - {{id: {AGENT}, upstream: pool}}
accounts:
  - {{id: acct_bench, balance: 0}}
keys:
  - {{id: key_bench, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", account: acct_bench, agents: "*", policy: fleet}}
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:{admin_port}"}}
store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/", timeout: 1s}}
""")
    return path


BODY = json.dumps({"message": "hi"})
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


class Client(threading.local):
    """One keep-alive connection per thread and gateway."""

    def call(self, port):
        conns = self.__dict__.setdefault("conns", {})
        for attempt in (1, 2):
            conn = conns.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conns[port] = conn
            try:
                conn.request("POST", f"/v1/agents/{AGENT}/chat", BODY, HEADERS)
                reply = conn.getresponse()
                reply.read()
                return reply.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conns.pop(port, None)
                if attempt == 2:
                    return 0
        return 0


def offer(ports, share, seconds, rate):
    """Open loop: a call every 1/rate s, to the gateway `share(i, t)` names (or none).
    Returns (sent at, gateway, status) for every call."""
    client = Client()
    calls = []
    lock = threading.Lock()
    start = time.monotonic()

    def one(at, who):
        status = client.call(ports[who])
        with lock:
            calls.append((at, who, status))

    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        i = 0
        while True:
            at = i / rate
            if at >= seconds:
                break
            now = time.monotonic() - start
            if at > now:
                time.sleep(at - now)
            who = share(i, at)
            if who is not None:
                pool.submit(one, time.monotonic() - start, who)
            i += 1
    return calls


def store_ops(admins):
    """Admissions, settlements and slice syncs the gateways sent Redis so far."""
    return {op: sum(metric_sum(a, "turnpike_store_duration_seconds_count", op=op) for a in admins)
            for op in ("admit", "settle", "slice")}


def report(name, calls, seconds, scripts, gateways):
    admitted = sorted(at for at, _, status in calls if status == 200)
    failed = sum(1 for _, _, status in calls if status not in (200, 429))
    limit = BURST + RATE * seconds
    most_in_a_second = max((sum(1 for t in admitted[i:] if t < a + 1.0) for i, a in enumerate(admitted)),
                           default=0)
    per_second = [sum(1 for t in admitted if s <= t < s + 1) for s in range(int(seconds))]
    print(f"{name}: {len(calls)} offered, {len(admitted)} admitted of a {limit} limit "
          f"({100 * len(admitted) / limit:.1f}%), at most {most_in_a_second} in any second "
          f"(limit {BURST + RATE}), {failed} failed")
    print(f"  admitted per second: {per_second}")
    print(f"  Redis scripts per call: {scripts / max(len(calls), 1):.3f} "
          f"({scripts} for {len(calls)} calls over {gateways} gateways)")
    return admitted


def shift_report(calls, shift_at, to):
    """After the load moves to gateway `to`: its admitted per 250 ms, and when it was last
    refused while the fleet had admitted less than the rate since the shift."""
    after = sorted((at, status) for at, who, status in calls if who == to and at >= shift_at)
    windows = []
    for k in range(8):
        lo, hi = shift_at + k * 0.25, shift_at + (k + 1) * 0.25
        windows.append(sum(1 for at, status in after if lo <= at < hi and status == 200))
    print(f"  after the shift, gateway {to + 1} admitted per 250 ms: {windows} "
          f"(the rate is {RATE // 4} per 250 ms)")
    # The first 250 ms window from which on every window admits at least 80% of the rate.
    for k in range(len(windows)):
        if all(w >= 0.8 * RATE / 4 for w in windows[k:]):
            print(f"  at the rate again {k * 250} ms after the shift")
            return k * 250
    print("  not at the rate within 2 s of the shift")
    return None


def main():
    global RATE, BURST
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rate", type=float, default=800)
    ap.add_argument("--gateways", type=int, default=4)
    ap.add_argument("--limit", type=int, default=RATE, help="the key's calls per second")
    ap.add_argument("--burst", type=int, default=BURST)
    args = ap.parse_args()
    RATE, BURST = args.limit, args.burst
    binary = os.path.join(ROOT, "target", "release", "turnpike")
    if not os.path.exists(binary):
        sys.exit("build first: cargo build --release")
    ensure_tools()
    tmp = tempfile.mkdtemp(prefix="turnpike-fleet-")
    procs = []
    try:
        worker_port, redis_port = free_port(), free_port()
        procs.append(upstream(tmp, worker_port))
        redis = redis_server(tmp, redis_port)
        procs.append(redis)
        ports, admins = [], []
        for g in range(args.gateways):
            port, admin = free_port(), free_port()
            config = write_config(tmp, f"fleet-{g}.yaml", worker_port, port, admin, redis_port)
            procs.append(subprocess.Popen([*PROXY_CPU, binary, "serve", "--config", config],
                                          **logged(tmp, f"fleet-{g}")))
            ports.append(port)
            admins.append(admin)
        for port in ports + [worker_port]:
            wait_port(port)
        scenarios = [
            ("even", lambda i, at: i % args.gateways),
            ("skewed 90/10", lambda i, at: 0 if i % 10 else 1),
            ("shift", lambda i, at: 0 if at < args.seconds / 2 else 1),
        ]
        print(f"{args.gateways} gateways, one Redis, a key limited to {RATE}/s burst {BURST}, "
              f"offered {args.rate:.0f}/s for {args.seconds:.0f} s each")
        for name, share in scenarios:
            before, ops_before = commandstats([redis_port]), store_ops(admins)
            redis_cpu = cpu_seconds(redis.pid)
            calls = offer(ports, share, args.seconds, args.rate)
            redis_cpu = cpu_seconds(redis.pid) - redis_cpu
            after, ops_after = commandstats([redis_port]), store_ops(admins)
            scripts = sum(after.get(c, 0) - before.get(c, 0) for c in ("evalsha", "eval"))
            report(name, calls, args.seconds, scripts, args.gateways)
            print(f"  Redis CPU per call: {1e6 * redis_cpu / len(calls):.1f} us")
            ops = {op: (ops_after[op] - ops_before[op]) / len(calls) for op in ops_after}
            print("  per call: " + ", ".join(f"{v:.3f} {op}" for op, v in ops.items())
                  + " (a run of the group commit carries several admissions and settlements)")
            if name == "shift":
                shift_report(calls, args.seconds / 2, 1)
            # Let every slice go back and the bucket refill before the next scenario.
            time.sleep(2)
        syncs = sum(metric_sum(a, "turnpike_store_duration_seconds_count", op="slice") for a in admins)
        print(f"slice syncs over all runs: {syncs:.0f}")
    finally:
        stop(procs, tmp)


if __name__ == "__main__":
    main()
