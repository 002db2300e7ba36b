#!/usr/bin/env python3
"""Several gateways on one Redis (issue 23): what the fleet's calls cost Redis.

N Turnpike processes (one worker thread each) share one redis-server; wrk loads each with the
load.py bench call (a priced agent, a policy with every bucket kind and a concurrency cap,
none binding). Two scenarios: one hot key, and traffic spread over 1,000 keys of 100
accounts. Reported per scenario: calls/s over all gateways, Redis CPU per call, Redis
commands per call (INFO commandstats), and per call the admissions that still went to Redis
and the syncs of slices, blocks and escrows.

Usage: benches/load.py --gateways 4 [--seconds 8] [--connections 8]   (connections per gateway)
"""
import hashlib
import os
import secrets
import subprocess
import tempfile
import threading

import load
from load import (AGENT, KEY, LOAD_CPU, ROOT, free_port, logged, metric_sum, redis_server, stop, upstream,
                  wait_port, write_policies)


def keys_lua(tmp, keys):
    """A wrk script calling with a key drawn at random from `keys` for each request."""
    path = os.path.join(tmp, "keys.lua")
    with open(path, "w") as f:
        f.write("local keys = {" + ",".join(f'"{k}"' for k in keys) + "}\n")
        f.write('local body = \'{"message":"What are your business hours?","session_id":"sess_bench"}\'\n'
                "request = function()\n"
                "  local k = keys[math.random(#keys)]\n"
                f'  return wrk.format("POST", "/v1/agents/{AGENT}/chat", '
                '{["Authorization"] = "Bearer " .. k, ["Content-Type"] = "application/json"}, body)\n'
                "end\n")
    return path


def write_config(tmp, name, worker_port, port, admin_port, redis_port, keys, accounts):
    pricing = "pricing: {input_per_mtok: 3000000, output_per_mtok: 15000000}"
    key_lines = "\n".join(
        f'  - {{id: key_{i}, sha256: "{hashlib.sha256(k.encode()).hexdigest()}", '
        f'account: {accounts[i % len(accounts)]}, agents: "*", policy: bench}}'
        for i, k in enumerate(keys))
    account_lines = "\n".join(f"  - {{id: {a}, balance: 9000000000000000}}" for a in accounts)
    with open(os.path.join(tmp, name), "w") as f:
        f.write(f"""threads: 1
upstreams:
  pool: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/invoke"}}
agents:
  - {{id: {AGENT}, upstream: pool, policy: bench, {pricing}}}
accounts:
{account_lines}
keys:
{key_lines}
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:{admin_port}"}}
store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/", timeout: 1s}}
""")


def redis_cpu(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "cpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_commands(port):
    return sum(load.commandstats([port]).values())


def scenario(name, tmp, n, seconds, connections, worker_port, keys, accounts):
    redis_port = free_port()
    procs = [redis_server(tmp, redis_port)]
    gateways = []
    try:
        for i in range(n):
            port, admin = free_port(), free_port()
            config = f"{name}-{i}.yaml"
            write_config(tmp, config, worker_port, port, admin, redis_port, keys, accounts)
            proc = subprocess.Popen([os.path.join(ROOT, "target/release/turnpike"), "serve", "--config",
                                     os.path.join(tmp, config)], **logged(tmp, f"{name}-{i}"))
            procs.append(proc)
            gateways.append((port, admin))
        for port, _ in gateways:
            wait_port(port)
        lua = keys_lua(tmp, keys)

        def run_wrk(port, secs, out):
            res = subprocess.run([*LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{secs}s", "-s", lua,
                                  f"http://127.0.0.1:{port}/v1/agents/{AGENT}/chat"], capture_output=True, text=True)
            out.append(res.stdout)

        def load_all(secs):
            outs = []
            threads = [threading.Thread(target=run_wrk, args=(port, secs, outs)) for port, _ in gateways]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return outs

        load_all(2)  # warm-up: first slices, blocks and escrows
        ops = {op: sum(metric_sum(a, "turnpike_store_duration_seconds_count", op=op) for _, a in gateways)
               for op in ("admit", "slice")}
        cpu0, cmds0 = redis_cpu(redis_port), redis_commands(redis_port)
        outs = load_all(seconds)
        cpu1, cmds1 = redis_cpu(redis_port), redis_commands(redis_port)
        calls = sum(int(line.split()[0]) for out in outs for line in out.splitlines() if "requests in" in line)
        after = {op: sum(metric_sum(a, "turnpike_store_duration_seconds_count", op=op) for _, a in gateways)
                 for op in ("admit", "slice")}
        per_call = lambda x: x / max(calls, 1)
        print(f"{name}: {calls / seconds:,.0f} calls/s over {n} gateways; Redis CPU "
              f"{per_call(cpu1 - cpu0) * 1e6:.1f} us and {per_call(cmds1 - cmds0):.2f} commands per call; "
              f"per call {per_call(after['admit'] - ops['admit']):.3f} admissions in Redis, "
              f"{per_call(after['slice'] - ops['slice']):.3f} syncs (slices, blocks, escrows)")
    finally:
        stop(procs, os.path.join(tmp, "nothing-to-remove"))


def run(args):
    load.ensure_tools()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "turnpike"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="turnpike-gateways-")
    write_policies(tmp)
    worker_port = free_port()
    worker = upstream(tmp, worker_port)
    try:
        n, secs, conns = args.gateways, args.seconds, args.connections
        print(f"{n} gateways, one Redis, wrk -c{conns} per gateway, {secs}s after a 2 s warm-up "
              f"(a 2-core machine: gateways, wrk, Redis and the upstream share it)")
        scenario("one hot key", tmp, n, secs, conns, worker_port, [KEY], ["acct_bench"])
        spread = ["ak_" + secrets.token_hex(20) for _ in range(1000)]
        scenario("1,000 keys of 100 accounts", tmp, n, secs, conns, worker_port, spread,
                 [f"acct_{i:03}" for i in range(100)])
    finally:
        stop([worker], tmp)
