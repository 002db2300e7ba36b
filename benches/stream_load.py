"""Streamed answers, measured (`benches/load.py --stream`): Turnpike relaying server-sent events.

A streaming worker (asyncio, on core 1 with the clients) answers every call with EVENTS events
GAP_MS apart, then its usage and `[DONE]`. Turnpike (one thread, embedded store, core 0) fronts
it. Reported, from one run:

- time to first event through Turnpike minus direct to the worker, p50 and p99, at
  `--connections` concurrent streams (keep-alive, one after another on each connection):
  once with events GAP_MS apart, where the Python worker and clients keep core 1 busy, and
  once PACED_GAP_MS apart, each call after a random pause of up to PACED_GAP_MS, where they
  do not, so what remains is Turnpike's;
- events relayed per second per core, and CPU per event (Turnpike's CPU from /proc over the
  events it relayed);
- Turnpike's RSS with `--stream-open` streams open at once (each a long, slow stream), against
  its RSS idle.
"""
import asyncio
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import load

EVENTS = 20
GAP_MS = 5
PACED_GAP_MS = 50
# The long streams the RSS run holds open: 600 events a second apart, far longer than the run.
LONG_EVENTS, LONG_GAP_MS = 600, 1000
USAGE = b'data: {"usage": {"input_tokens": 45, "output_tokens": 320, "total_tokens": 365}}\n\n'


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


async def worker(reader, writer):
    """One keep-alive connection of the streaming worker."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            target = head.split(b" ", 2)[1]
            events, gap = {b"/long": (LONG_EVENTS, LONG_GAP_MS), b"/paced": (EVENTS, PACED_GAP_MS)}.get(
                target, (EVENTS, GAP_MS))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(events):
                first = b', "session_id": "sess_bench"' if i == 0 else b""
                writer.write(chunk(b'data: {"delta": "word %d "%s}\n\n' % (i, first)))
                await writer.drain()
                await asyncio.sleep(gap / 1000)
            writer.write(chunk(USAGE) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def request(port, path, body=b'{"message":"stream please","session_id":"sess_bench"}'):
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {load.KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def one_stream(reader, writer, wire):
    """Sends one call on an open connection and reads its stream to the end: the seconds to
    the first event's bytes, and the events read."""
    sent = time.perf_counter()
    writer.write(wire)
    await reader.readuntil(b"\r\n\r\n")
    first, events = None, 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return first, events
        data = await reader.readexactly(size + 2)
        if first is None:
            first = time.perf_counter() - sent
        events += data.count(b"\n\n")


async def closed_loop(port, path, seconds, connections, jitter=0.0):
    """`connections` connections, each streaming one call after another for `seconds`, each
    call after a random pause of up to `jitter` seconds (so calls do not all start at once)."""
    wire = request(port, path)
    firsts, counts = [], []
    stop_at = time.perf_counter() + seconds

    async def connection():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop_at:
            await asyncio.sleep(random.uniform(0, jitter))
            first, events = await one_stream(reader, writer, wire)
            firsts.append(first)
            counts.append(events)
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return firsts, sum(counts)


async def hold_open(port, path, streams):
    """Opens `streams` streams and returns their connections once each has its first event."""
    wire = request(port, path)
    opened = []

    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(wire)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"\n\n")
        opened.append(writer)

    for start in range(0, streams, 100):
        await asyncio.gather(*(one() for _ in range(min(100, streams - start))))
    return opened


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def config(tmp, worker_port, port, admin_port):
    with open(os.path.join(tmp, "turnpike.yaml"), "w") as f:
        f.write(f"""threads: 1
upstreams:
  fast: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/fast"}}
  long: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/long"}}
  paced: {{endpoints: ["127.0.0.1:{worker_port}"], path: "/paced"}}
agents:
  - {{id: {load.AGENT}, upstream: fast, policy: bench, pricing: {{input_per_mtok: 3000000, output_per_mtok: 15000000}}}}
  - {{id: ag_long, upstream: long, policy: bench, pricing: {{input_per_mtok: 3000000, output_per_mtok: 15000000}}}}
  - {{id: ag_paced, upstream: paced, policy: bench, pricing: {{input_per_mtok: 3000000, output_per_mtok: 15000000}}}}
accounts:
  - {{id: acct_bench, balance: 9000000000000000}}
keys:
  - {{id: key_bench, sha256: "{load.hashlib.sha256(load.KEY.encode()).hexdigest()}", account: acct_bench, agents: "*", policy: bench}}
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:{admin_port}"}}
""")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run(args):
    # Each stream holds a descriptor in the client, the worker and twice in Turnpike.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    if load.PINNED:
        os.sched_setaffinity(0, {1})
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "turnpike"], cwd=load.ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="turnpike-stream-")
    worker_port, port, admin_port = (load.free_port() for _ in range(3))
    load.write_policies(tmp)
    config(tmp, worker_port, port, admin_port)
    gateway = subprocess.Popen([*load.PROXY_CPU, os.path.join(load.ROOT, "target/release/turnpike"), "serve",
                                "--config", os.path.join(tmp, "turnpike.yaml")], **load.logged(tmp, "turnpike"))
    try:
        asyncio.run(measure(args, gateway, worker_port, port))
    finally:
        load.stop([gateway], tmp)


async def measure(args, gateway, worker_port, port):
    server = await asyncio.start_server(worker, "127.0.0.1", worker_port, backlog=4096)
    load.wait_port(port)
    chat = f"/v1/agents/{load.AGENT}/chat"
    c, seconds = args.connections, args.seconds
    await closed_loop(port, chat, 2, c)  # warm-up
    direct, _ = await closed_loop(worker_port, "/fast", seconds, c)
    before = load.cpu_seconds(gateway.pid)
    through, events = await closed_loop(port, chat, seconds, c)
    cpu = load.cpu_seconds(gateway.pid) - before
    # Paced calls start at random moments, as independent clients' do, not all at once.
    jitter = PACED_GAP_MS / 1000
    paced_direct, _ = await closed_loop(worker_port, "/paced", seconds, c, jitter)
    paced_through, _ = await closed_loop(port, "/v1/agents/ag_paced/chat", seconds, c, jitter)
    idle_rss = rss_mib(gateway.pid)
    opened = await hold_open(port, "/v1/agents/ag_long/chat", args.stream_open)
    await asyncio.sleep(1)
    open_rss = rss_mib(gateway.pid)
    for writer in opened:
        writer.close()
    server.close()

    ms = lambda s: s * 1000
    print(f"\nstreams: {EVENTS} events {GAP_MS} ms apart, then usage and [DONE]; {c} concurrent streams, "
          f"{seconds} s each way; Turnpike one thread on core 0, worker and clients on core 1\n")
    print(f"{'first event':<36}{'p50 ms':>10}{'p99 ms':>10}{'streams':>10}")
    for gap, d, t in ((GAP_MS, direct, through), (PACED_GAP_MS, paced_direct, paced_through)):
        print(f"{f'direct, events {gap} ms apart':<36}{ms(pct(d, .5)):>10.3f}{ms(pct(d, .99)):>10.3f}{len(d):>10}")
        print(f"{f'Turnpike, events {gap} ms apart':<36}{ms(pct(t, .5)):>10.3f}{ms(pct(t, .99)):>10.3f}{len(t):>10}")
        print(f"{'  Turnpike - direct':<36}{ms(pct(t, .5) - pct(d, .5)):>+10.3f}"
              f"{ms(pct(t, .99) - pct(d, .99)):>+10.3f}   (targets +0.3 / +1.0 ms)")
    print(f"\nevents relayed: {events} in {seconds} s, Turnpike CPU {cpu:.2f} s: "
          f"{events / max(cpu, 1e-9):,.0f} events per CPU second, {cpu / max(events, 1) * 1e6:.1f} µs CPU per event")
    print(f"RSS: {idle_rss:.1f} MiB after the runs, {open_rss:.1f} MiB with {len(opened)} streams open "
          f"(+{(open_rss - idle_rss) * 1024 / max(len(opened), 1):.1f} KiB a stream; target <= 64 MiB)")
    sys.stdout.flush()
