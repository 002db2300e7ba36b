#!/usr/bin/env python3
"""Scale, measured: what Turnpike holds in memory and in Redis as connections, agents, keys and
calls grow. Three parts, each on by its flag (all three without flags):

--connections N  Turnpike (embedded store) with N keep-alive client connections open, each
                 calling once every `--interval` seconds, for `--minutes`; its RSS (from /proc)
                 sampled every 10 s: at start, largest, at end.
--big-config     A config of `--agents` agents and `--keys` keys: how long `serve` takes to
                 answer /readyz, how long `POST /admin/reload` takes after one policy change,
                 and the latency of one-at-a-time calls while reloads run against without;
                 with `--redis`, on the embedded store and on a Redis store of its own in the
                 same run, with the Redis commands a start and a reload cost (INFO stats) and
                 `--instances` instances on one Redis reloading at once.
--redis-memory   Turnpike on its own redis-server after 3 s of calls by one key: Redis's
                 `MEMORY USAGE` of each kind of key a key, an account and a call leave behind.

Usage: benches/scale.py [--connections 1000] [--minutes 10] [--big-config [--redis] [--instances 4]]
                        [--redis-memory]
Needs the release build (built here) and nginx (the worker); prints what it measured.
"""
import argparse
import hashlib
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the load benchmark's worker, config and helpers)

BINARY = os.path.join(load.ROOT, "target", "release", "turnpike")
ADMIN_TOKEN = "scale-admin-token"
BODY = b'{"message":"What are your business hours?","session_id":"sess_bench"}'


def call_bytes(key):
    return (f"POST /v1/agents/{load.AGENT}/chat HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def cpu_s(pid):
    """User and system CPU seconds the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(tmp, config, name="turnpike"):
    return subprocess.Popen([*load.PROXY_CPU, BINARY, "serve", "--config", os.path.join(tmp, config)],
                            **load.logged(tmp, name))


def wait_ready(admin_port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError("Turnpike did not become ready")


def stop(*procs):
    for p in procs:
        if p:
            p.send_signal(2)
    for p in procs:
        if p:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def connections(args, tmp, worker_port):
    """RSS with many open client connections, each calling now and then."""
    port, admin_port = load.free_port(), load.free_port()
    load.write_config(tmp, "conns.yaml", worker_port, port, admin_port)
    gw = serve(tmp, "conns.yaml")
    try:
        load.wait_port(port)
        request = call_bytes(load.KEY)
        sel = selectors.DefaultSelector()
        socks = []
        for _ in range(args.connections):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
        answered, samples = 0, []
        started = time.time()
        next_sample = started
        per_round = args.interval
        while time.time() - started < args.minutes * 60:
            round_started = time.time()
            for s in socks:
                s.sendall(request)
            waiting = len(socks)
            while waiting:
                for key, _ in sel.select(timeout=5):
                    data = key.fileobj.recv(65536)
                    if not data:
                        sys.exit("a client connection was closed")
                    # Answers are small: one recv holds one whole answer.
                    answered += data.count(b"HTTP/1.1 200")
                    waiting -= 1
            if time.time() >= next_sample:
                samples.append(rss_mib(gw.pid))
                next_sample += 10
            time.sleep(max(0.0, per_round - (time.time() - round_started)))
        samples.append(rss_mib(gw.pid))
        print(f"{args.connections} open connections, {answered} calls over {args.minutes:g} min: RSS "
              f"{samples[0]:.1f} MiB at start, {max(samples):.1f} MiB largest, {samples[-1]:.1f} MiB at end "
              f"({len(samples)} samples)")
        for s in socks:
            s.close()
    finally:
        stop(gw)


def write_big_config(args, tmp, name, worker_port, port, admin_port, redis_port=None):
    """`args.agents` agents, `args.keys` keys over 1,000 accounts, one policy (`bench`)."""
    path = os.path.join(tmp, name)
    digest = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    bench_key = hashlib.sha256(load.KEY.encode()).hexdigest()
    others = args.agents - 1
    store = f'store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/", timeout: 1s}}\n' if redis_port else ""
    with open(path, "w") as f:
        # The bench agent and key first (the calls use them), then more of the same shape.
        f.write(f"""threads: 1
upstreams:
  pool: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/invoke"}}
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:{admin_port}", token_sha256: "{digest}"}}
{store}agents:
  - {{id: {load.AGENT}, upstream: pool, policy: bench}}
""")
        f.writelines(f"  - {{id: ag_{i:06d}, upstream: pool, policy: bench}}\n" for i in range(others))
        f.write("accounts:\n")
        f.writelines(f"  - {{id: acct_{i:04d}, balance: 1000000}}\n" for i in range(1000))
        f.write(f'keys:\n  - {{id: key_bench, sha256: "{bench_key}", account: acct_0000, agents: "*", policy: bench}}\n')
        f.writelines(
            f'  - {{id: key_{i:06d}, sha256: "{hashlib.sha256(f"ak_scale{i:032d}".encode()).hexdigest()}", '
            f'account: acct_{i % 1000:04d}, agents: [ag_{i % others:06d}], policy: bench}}\n'
            for i in range(args.keys - 1))
    return path


def redis_commands(port):
    """Commands the Redis server on `port` has run (INFO stats), less this probe."""
    if port is None:
        return 0
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "stats"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split("total_commands_processed:")[1].split()[0])


def reload_now(admin_port):
    """`POST /admin/reload`; returns how long it took to answer 200."""
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/admin/reload", method="POST",
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, data=b"")
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        json.load(r)
    return time.perf_counter() - t


def change_policy(tmp, generation):
    """One policy's `rate` changed in the policy directory (the reload an SRE makes)."""
    with open(os.path.join(tmp, "policies", "bench.yaml"), "w") as f:
        f.write(f"policies:\n  bench:\n    requests: {{rate: {10_000_000 + generation}, per: 1s}}\n"
                "    tokens: {rate: 1000000000000, per: 1s}\n    concurrency: 100000\n")


def big_config(args, tmp, worker_port):
    """Start-up and reload of a large config on each store, the Redis commands each costs, and
    what reloads do to call latency; with `--instances N`, also N instances on one Redis
    reloading at once."""
    redis_port = load.free_port() if args.redis else None
    redis = load.redis_server(tmp, redis_port) if redis_port else None
    rows = []
    try:
        stores = [("embedded", None)] + ([("redis", redis_port)] if redis_port else [])
        for store, store_port in stores:
            rows.append(one_big_config(args, tmp, worker_port, store, store_port))
        if redis_port and args.instances > 1:
            rows.append(many_reloading(args, tmp, worker_port, redis_port))
    finally:
        stop(redis)
    print(f"{args.agents} agents, {args.keys} keys, 1000 accounts, one policy; {args.reloads} reloads after one "
          f"policy change each:")
    print(f"{'store':24} {'ready s':>8} {'start cmds':>11} {'restart cmds':>13} {'RSS MiB':>8} "
          f"{'reload s (median, max)':>23} {'reload CPU s':>13} {'reload cmds':>12} {'p50/p99 us quiet':>17} "
          f"{'p50/p99 us reloading':>21}")
    for r in rows:
        print(f"{r['store']:24} {r['ready']:8.2f} {r['start_cmds']:>11} {r['restart_cmds']:>13} {r['rss']:8.0f} "
              f"{statistics.median(r['reloads']):11.2f} {max(r['reloads']):11.2f} {r['reload_cpu']:13.2f} "
              f"{r['reload_cmds']:12d} {r.get('quiet', '-'):>17} {r.get('busy', '-'):>21}")
    if args.instances > 1:
        print(f"The {args.instances} instances share one core (as the single gateway does): their reload's wall "
              "time is their CPU time added up; reload CPU s is one instance's.")


def one_big_config(args, tmp, worker_port, store, redis_port):
    port, admin_port = load.free_port(), load.free_port()
    name = f"big-{store}.yaml"
    path = write_big_config(args, tmp, name, worker_port, port, admin_port, redis_port)
    size_mib = os.path.getsize(path) / 2**20
    # Three starts: the first meets an empty store, the others a store that has seen the
    # config (a restart); the median is reported.
    ready, start_cmds, gw = [], [], None
    for attempt in range(3):
        stop(gw)
        before = redis_commands(redis_port)
        started = time.perf_counter()
        gw = serve(tmp, name, f"big-{store}-{attempt}")
        wait_ready(admin_port)
        ready.append(time.perf_counter() - started)
        start_cmds.append(redis_commands(redis_port) - before)
    try:
        ready_s = statistics.median(ready)
        rss = rss_mib(gw.pid)
        lua = load.post_lua(tmp)
        route = f"/v1/agents/{load.AGENT}/chat"
        quiet = load.run_wrk(port, route, args.seconds, 1, lua)
        # One reload with no calls running: the Redis commands it costs are its own (and
        # the background checks', two a second).
        change_policy(tmp, 1000)
        commands, cpu = redis_commands(redis_port), cpu_s(gw.pid)
        reloads = [reload_now(admin_port)]
        reload_cmds = redis_commands(redis_port) - commands
        reload_cpu = cpu_s(gw.pid) - cpu

        def reload_all():
            for generation in range(args.reloads):
                time.sleep(args.seconds / (args.reloads + 1))
                change_policy(tmp, generation)
                reloads.append(reload_now(admin_port))

        reloader = threading.Thread(target=reload_all)
        reloader.start()
        busy = load.run_wrk(port, route, args.seconds, 1, lua)
        reloader.join()
        print(f"{store}: {size_mib:.1f} MiB of YAML, ready in {ready_s:.2f} s")
        return {"store": store, "ready": ready_s, "start_cmds": start_cmds[0], "restart_cmds": start_cmds[-1],
                "rss": rss, "reloads": reloads, "reload_cmds": reload_cmds, "reload_cpu": reload_cpu,
                "quiet": f"{quiet['latency']['50%']:.0f}/{quiet['latency']['99%']:.0f}",
                "busy": f"{busy['latency']['50%']:.0f}/{busy['latency']['99%']:.0f}"}
    finally:
        stop(gw)


def many_reloading(args, tmp, worker_port, redis_port):
    """`args.instances` instances of the big config on one Redis, reloading at once."""
    gateways, admins = [], []
    try:
        for i in range(args.instances):
            port, admin_port = load.free_port(), load.free_port()
            name = f"big-many-{i}.yaml"
            write_big_config(args, tmp, name, worker_port, port, admin_port, redis_port)
            gateways.append(serve(tmp, name, f"big-many-{i}"))
            admins.append(admin_port)
        started = time.perf_counter()
        for admin_port in admins:
            wait_ready(admin_port, timeout=300)
        ready_s = time.perf_counter() - started
        reloads, reload_cmds, reload_cpu = [], [], []
        for generation in range(args.reloads):
            change_policy(tmp, 100 + generation)
            commands, cpu = redis_commands(redis_port), [cpu_s(g.pid) for g in gateways]
            threads, took = [], []
            for admin_port in admins:
                t = threading.Thread(target=lambda p=admin_port: took.append(reload_now(p)))
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
            reloads.append(max(took))
            reload_cmds.append((redis_commands(redis_port) - commands) // args.instances)
            reload_cpu.append(max(cpu_s(g.pid) - c for g, c in zip(gateways, cpu)))
        return {"store": f"redis, {args.instances} at once", "ready": ready_s, "start_cmds": "-",
                "restart_cmds": "-", "rss": max(rss_mib(g.pid) for g in gateways), "reloads": reloads,
                "reload_cmds": max(reload_cmds), "reload_cpu": statistics.median(reload_cpu)}
    finally:
        stop(*gateways)


def redis_memory(args, tmp, worker_port):
    """MEMORY USAGE of what one key, one account and each call leave in Redis."""
    port, admin_port, redis_port = load.free_port(), load.free_port(), load.free_port()
    os.makedirs(os.path.join(tmp, "redis"), exist_ok=True)
    redis = subprocess.Popen([*load.LOAD_CPU, "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--dir", os.path.join(tmp, "redis")], stdout=subprocess.DEVNULL)
    load.write_config(tmp, "mem.yaml", worker_port, port, admin_port, redis_port)
    gw = None
    try:
        load.wait_port(redis_port)
        gw = serve(tmp, "mem.yaml")
        load.wait_port(port)
        load.run_wrk(port, f"/v1/agents/{load.AGENT}/chat", 3, 8, load.post_lua(tmp))

        def cli(*words):
            return subprocess.run(["redis-cli", "-p", str(redis_port), *words], capture_output=True, text=True,
                                  check=True).stdout.strip()

        def first(pattern):
            """One key matching `pattern`."""
            return cli("SCAN", "0", "MATCH", pattern, "COUNT", "1000000").split()[1]

        calls = int(cli("XLEN", "turnpike:usage"))
        account = "turnpike:{account:acct_bench}"
        # Config keys are read from the file: Redis holds no record of them.
        rows = [
            ("key buckets (limits hash)", f"{account}:key:key_bench:limits", 1),
            ("account hash (balance, reserved)", f"{account}:account", 1),
            ("account usage hash (one key x agent row)", f"{account}:usage", 1),
            ("agent buckets", f"turnpike:{{agent:{load.AGENT}}}:limits", 1),
        ]
        print(f"Redis MEMORY USAGE after {calls} calls by one key (bytes):")
        for label, key, per in rows:
            print(f"  {label:48} {int(cli('MEMORY', 'USAGE', key) or 0) // per:>8}")
        marker = first(f"{account}:settled:*")
        print(f"  {'settled marker, per call (~60 s once settled)':48} {int(cli('MEMORY', 'USAGE', marker)):>8}")
        stream = int(cli("MEMORY", "USAGE", "turnpike:usage", "SAMPLES", "0"))
        print(f"  {'usage stream entry, per call':48} {stream // max(calls, 1):>8}")
        print(f"  used_memory {cli('INFO', 'memory').split('used_memory:')[1].split()[0]} bytes in all, "
              f"{cli('DBSIZE')} keys")
    finally:
        stop(gw, redis)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, help="open client connections (default 1000 when no part is chosen)")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between one connection's calls")
    ap.add_argument("--big-config", action="store_true")
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--seconds", type=int, default=10, help="length of each latency run (--big-config)")
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--redis", action="store_true", help="--big-config on a Redis store too, beside the embedded")
    ap.add_argument("--instances", type=int, default=4,
                    help="--big-config --redis: also this many instances on one Redis reloading at once")
    ap.add_argument("--redis-memory", action="store_true")
    args = ap.parse_args()
    everything = not (args.connections or args.big_config or args.redis_memory)
    load.ensure_tools()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "turnpike"], cwd=load.ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="turnpike-scale-")
    worker_port = load.free_port()
    load.write_policies(tmp)
    worker = load.upstream(tmp, worker_port)
    try:
        load.wait_port(worker_port)
        if args.connections or everything:
            args.connections = args.connections or 1000
            connections(args, tmp, worker_port)
        if args.big_config or everything:
            big_config(args, tmp, worker_port)
        if args.redis_memory or everything:
            redis_memory(args, tmp, worker_port)
    finally:
        load.stop([worker], tmp)


if __name__ == "__main__":
    main()
