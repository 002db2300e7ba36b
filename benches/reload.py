#!/usr/bin/env python3
"""What a reload costs the traffic flowing through it: p50/p99 latency of a steady load with
and without config reloads, in alternating runs.

Each run is wrk (32 keep-alive connections) against Turnpike fronting an nginx upstream. In a
"reloads" run, 20 `POST /admin/reload` calls are spread over the run, each after rewriting the
policy file (so every reload parses, validates and swaps a changed set). Medians over rounds.

Usage: benches/reload.py [--seconds 10] [--rounds 3] [--reloads 20]
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

from load import (AGENT, KEY, PROXY_CPU, ROOT, ensure_tools, free_port, post_lua, run_wrk, stop,
                  upstream, wait_port)

POLICY = "policies:\n  bench:\n    requests: {{rate: {rate}, per: 1s}}\n    concurrency: 100000\n"


def reload_during(admin_port, token, policy_file, seconds, count, results):
    """Spreads `count` reloads over `seconds`, each with a changed policy file."""
    for i in range(count):
        time.sleep(seconds / (count + 1))
        with open(policy_file, "w") as f:
            f.write(POLICY.format(rate=10_000_000 + i))
        req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/admin/reload", method="POST",
                                     headers={"Authorization": f"Bearer {token}"}, data=b"")
        started = time.perf_counter()
        with urllib.request.urlopen(req) as resp:
            body = json.load(resp)
        results.append((time.perf_counter() - started, body["generation"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    ensure_tools()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "turnpike"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="turnpike-reload-")
    worker_port, tp_port, admin_port = (free_port() for _ in range(3))
    token = "bench-admin-token"
    lua = post_lua(tmp)
    os.makedirs(os.path.join(tmp, "policies"))
    policy_file = os.path.join(tmp, "policies", "bench.yaml")
    with open(policy_file, "w") as f:
        f.write(POLICY.format(rate=10_000_000))
    with open(os.path.join(tmp, "turnpike.yaml"), "w") as f:
        f.write(f"""listen: "127.0.0.1:{tp_port}"
threads: 1
admin: {{listen: "127.0.0.1:{admin_port}", token_sha256: "{hashlib.sha256(token.encode()).hexdigest()}"}}
upstreams:
  pool: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/invoke"}}
agents:
  - {{id: {AGENT}, upstream: pool, pricing: {{input_per_mtok: 3000000, output_per_mtok: 15000000}}}}
accounts:
  - {{id: acct_bench, balance: 9000000000000000}}
keys:
  - {{id: key_bench, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", account: acct_bench, agents: "*", policy: bench}}
""")
    procs = [
        upstream(tmp, worker_port),
        subprocess.Popen([*PROXY_CPU, os.path.join(ROOT, "target/release/turnpike"), "serve", "--config",
                          os.path.join(tmp, "turnpike.yaml")], stderr=subprocess.DEVNULL),
    ]
    path = f"/v1/agents/{AGENT}/chat"
    runs = {"steady": [], "reloads": []}
    reload_times = []
    try:
        for port in (worker_port, tp_port, admin_port):
            wait_port(port)
        run_wrk(tp_port, path, 2, args.connections, lua)
        for _ in range(args.rounds):
            for mode in runs:
                reloader = None
                if mode == "reloads":
                    reloader = threading.Thread(target=reload_during, args=(
                        admin_port, token, policy_file, args.seconds, args.reloads, reload_times))
                    reloader.start()
                r = run_wrk(tp_port, path, args.seconds, args.connections, lua)
                if reloader:
                    reloader.join()
                if r.get("non2xx"):
                    print(f"warning: {r['non2xx']} non-2xx answers in a {mode} run")
                runs[mode].append(r)
    finally:
        stop(procs, tmp)

    med = lambda mode, f: statistics.median(f(r) for r in runs[mode])
    print(f"\n{args.rounds} rounds x {args.seconds}s each mode, wrk -t1 -c{args.connections}, "
          f"{args.reloads} reloads per reload run; medians\n")
    print(f"{'run':<10}{'req/s':>10}{'p50 us':>10}{'p90 us':>10}{'p99 us':>10}")
    for mode in runs:
        print(f"{mode:<10}{med(mode, lambda r: r['rps']):>10.0f}{med(mode, lambda r: r['latency']['50%']):>10.0f}"
              f"{med(mode, lambda r: r['latency']['90%']):>10.0f}{med(mode, lambda r: r['latency']['99%']):>10.0f}")
    p99 = {mode: med(mode, lambda r: r["latency"]["99%"]) for mode in runs}
    print(f"\np99 with reloads / without = {p99['reloads'] / p99['steady']:.2f}x")
    took = sorted(t for t, _ in reload_times)
    print(f"{len(took)} reloads answered in median {statistics.median(took) * 1000:.1f} ms, "
          f"max {took[-1] * 1000:.1f} ms (last generation {max(g for _, g in reload_times)})")


if __name__ == "__main__":
    main()
