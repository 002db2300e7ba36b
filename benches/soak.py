#!/usr/bin/env python3
"""Soak: minutes of mixed good and hostile traffic against one gateway, then the books.

Starts `target/release/turnpike serve` (embedded store) in front of a worker of its own, and
runs, side by side: good calls (random usage), calls the worker answers with invalid usage or
an error, and hostile clients (slow and oversized heads, trickled bodies, two Authorization
headers, bad keys, path tricks, smuggling framings). Every 10 s it samples the gateway's RSS.
At the end it compares what the clients were served with what the gateway recorded: usage
totals (`/admin/usage`), the balance, and `turnpike_requests_total`.

Usage: benches/soak.py [--minutes 10] [--clients 4]   (not run in CI; needs the release build)
Exits 1 on any accounting mismatch, a gateway 5xx it should not give, or a crash.
"""
import argparse
import hashlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "ak_soak0123456789abcdef0123456789abcdef00"
ADMIN = "admin-soak-token"
AGENT = "ag_soak"
START_BALANCE = 10**15


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker(BaseHTTPRequestHandler):
    """`good IN OUT` answers with that usage; `invalid` with a wrong total; `error` with 500."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        words = body["message"].split()
        status, usage = 200, None
        if words[0] == "good":
            i, o = int(words[1]), int(words[2])
            usage = {"input_tokens": i, "output_tokens": o, "total_tokens": i + o}
        elif words[0] == "invalid":
            usage = {"input_tokens": 3, "output_tokens": 4, "total_tokens": 99}
        else:
            status = 500
        answer = json.dumps({"response": "ok", "session_id": body.get("session_id", "s"), "usage": usage}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


class Books:
    """What the clients were served, and what went wrong."""

    def __init__(self):
        self.lock = threading.Lock()
        self.served = 0
        self.input = self.output = self.cost = 0
        self.statuses = {}
        self.problems = []

    def count(self, status):
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def problem(self, text):
        with self.lock:
            if len(self.problems) < 50:
                self.problems.append(text)


def good_client(port, books, stop):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        kind = random.random()
        i, o = random.randint(0, 5000), random.randint(0, 5000)
        message = f"good {i} {o}" if kind < 0.8 else ("invalid" if kind < 0.9 else "error")
        try:
            conn.request("POST", f"/v1/agents/{AGENT}/chat", json.dumps({"message": message}),
                         {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            r = conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException) as e:
            books.problem(f"good client: {e!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        books.count(r.status)
        expected = {"good": 200, "invalid": 502, "error": 500}[message.split()[0]]
        if r.status != expected:
            books.problem(f"{message}: {r.status} {body[:200]!r}")
        elif r.status == 200:
            with books.lock:
                books.served += 1
                books.input += i
                books.output += o
                books.cost += i + 2 * o


def raw(port, data, pause=0.0, half_close=True):
    """Sends bytes; returns the status line's code (0 if closed without one). Without
    `half_close` the gateway must end the connection itself (its header timeout)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            for piece in data:
                s.sendall(piece)
                if pause:
                    time.sleep(pause)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            first = s.recv(64)
            return int(first.split()[1]) if first.startswith(b"HTTP/1.") else 0
    except (OSError, ValueError, IndexError):
        return 0


def hostile_client(port, books, stop):
    path = f"/v1/agents/{AGENT}/chat"
    body = b'{"message":"good 1 1"}'
    head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
    attacks = {
        "two authorizations": ([(head + f"Authorization: Bearer ak_garbage\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body], {401}),
        "bad key": ([f"POST {path} HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer ak_nope\r\nContent-Length: 2\r\n\r\n{{}}".encode()], {401}),
        "fragment": ([f"POST {path}#/../admin HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\n{{}}".encode()], {400, 404}),
        "dot segments": ([f"POST /v1/agents/../agents/{AGENT}/chat HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\n{{}}".encode()], {404}),
        "cl+te": ([(head + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode()], {400}),
        "huge head": ([(head + "X-Pad: " + "p" * 40000 + "\r\n\r\n").encode()], {431}),
        "many lines": ([(head + "".join(f"X-{n}: v\r\n" for n in range(300)) + "\r\n").encode()], {431}),
        "half a head": ([head.encode()[:30]], {0}),
        "trickled body": ([(head + "Content-Length: 50\r\n\r\n").encode()] + [b" "] * 4, {408, 0}),
    }
    while not stop.is_set():
        name = random.choice(list(attacks))
        pieces, allowed = attacks[name]
        pause = 0.5 if name == "trickled body" else 0.0
        status = raw(port, pieces, pause=pause, half_close=name != "half a head")
        books.count(f"hostile {status}")
        if status not in allowed:
            books.problem(f"{name}: got {status}, expected one of {sorted(allowed)}")
        if status >= 500:
            books.problem(f"{name}: gateway answered {status}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def admin_get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN}"})
    r = conn.getresponse()
    return r.read().decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=4, help="good clients (and as many hostile ones)")
    args = ap.parse_args()
    binary = os.path.join(ROOT, "target/release/turnpike")
    if not os.path.exists(binary):
        sys.exit("target/release/turnpike is missing: cargo build --release --bin turnpike")
    worker = ThreadingHTTPServer(("127.0.0.1", 0), Worker)
    threading.Thread(target=worker.serve_forever, daemon=True).start()
    tmp = tempfile.mkdtemp(prefix="turnpike-soak-")
    port, admin_port = free_port(), free_port()
    os.makedirs(os.path.join(tmp, "policies"))
    with open(os.path.join(tmp, "turnpike.yaml"), "w") as f:
        f.write(f"""listen: "127.0.0.1:{port}"
limits: {{header_timeout: 2s, body_timeout: 2s}}
admin: {{listen: "127.0.0.1:{admin_port}", token_sha256: "{hashlib.sha256(ADMIN.encode()).hexdigest()}"}}
upstreams:
  pool: {{endpoints: ["127.0.0.1:{worker.server_address[1]}"], path: "/invoke"}}
agents:
  - {{id: {AGENT}, upstream: pool, pricing: {{input_per_mtok: 1000000, output_per_mtok: 2000000, reserve: 1}}}}
accounts:
  - {{id: acct_soak, balance: {START_BALANCE}}}
keys:
  - {{id: key_soak, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", account: acct_soak, agents: "*"}}
""")
    gateway = subprocess.Popen([binary, "serve", "--config", os.path.join(tmp, "turnpike.yaml")],
                               stdout=open(os.path.join(tmp, "gateway.log"), "w"), stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    books, stop = Books(), threading.Event()
    threads = [threading.Thread(target=good_client, args=(port, books, stop)) for _ in range(args.clients)]
    threads += [threading.Thread(target=hostile_client, args=(port, books, stop)) for _ in range(args.clients)]
    for t in threads:
        t.start()
    samples = []
    end = time.time() + args.minutes * 60
    while time.time() < end and gateway.poll() is None:
        samples.append(rss_kib(gateway.pid))
        time.sleep(min(10, max(0.1, end - time.time())))
    stop.set()
    for t in threads:
        t.join()
    crashed = gateway.poll() is not None
    usage = json.loads(admin_get(admin_port, "/admin/usage?account=acct_soak")) if not crashed else {}
    balance = json.loads(admin_get(admin_port, "/admin/accounts/acct_soak/balance")) if not crashed else {}
    gateway.terminate()
    gateway.wait()
    mismatches = []
    if crashed:
        mismatches.append("the gateway exited during the run")
    else:
        for field, want in [("requests", books.served), ("input_tokens", books.input),
                            ("output_tokens", books.output), ("cost", books.cost)]:
            if usage.get(field) != want:
                mismatches.append(f"usage {field}: gateway {usage.get(field)}, clients served {want}")
        if balance.get("balance") != START_BALANCE - books.cost or balance.get("reserved") != 0:
            mismatches.append(f"balance {balance}, expected {START_BALANCE - books.cost} and 0 reserved")
    print(f"soak: {args.minutes} min, {args.clients} good + {args.clients} hostile clients")
    print("answers:", json.dumps(dict(sorted(books.statuses.items(), key=str))))
    print(f"served 200: {books.served}, tokens {books.input}+{books.output}, cost {books.cost}")
    if samples:
        print(f"RSS KiB: first {samples[0]}, max {max(samples)}, last {samples[-1]} ({len(samples)} samples)")
    for p in books.problems:
        print("problem:", p)
    for m in mismatches:
        print("MISMATCH:", m)
    if mismatches or books.problems:
        sys.exit(1)
    print("books balance: no mismatch")


if __name__ == "__main__":
    main()
