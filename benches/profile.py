#!/usr/bin/env python3
"""Where Turnpike's CPU goes: a flame graph of one Turnpike under the load benchmark's traffic.

Starts the same upstream and the same one-thread Turnpike as benches/load.py (embedded store,
or `--redis` for the Redis store on its own redis-server), loads it with wrk for `--seconds`,
samples it with `perf record --call-graph dwarf` meanwhile (release builds keep no frame
pointers; DWARF unwinding needs only what the release profile keeps), and folds the samples
into an SVG with inferno (`cargo install inferno`). Writes `target/profile/flame-<store>.svg` unless `--out` says otherwise (a regenerated artefact:
not kept in git).

Usage: benches/profile.py [--seconds 15] [--redis] [--out FILE]
Needs perf (Debian's linux-perf), inferno, wrk and nginx; says which is missing.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the load benchmark's upstream, configs and wrk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--redis", action="store_true", help="profile Turnpike on the Redis store")
    ap.add_argument("--out", help="the SVG to write (default target/profile/flame-embedded.svg or -redis.svg)")
    args = ap.parse_args()
    missing = [tool for tool in ("perf", "inferno-collapse-perf", "inferno-flamegraph") if not shutil.which(tool)]
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (apt-get install linux-perf; cargo install inferno)")
    load.ensure_tools()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "turnpike"], cwd=load.ROOT, check=True)
    out = args.out or os.path.join(load.ROOT, "target", "profile", f"flame-{'redis' if args.redis else 'embedded'}.svg")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="turnpike-profile-")
    worker_port, port, admin_port, redis_port = (load.free_port() for _ in range(4))
    load.write_policies(tmp)
    load.write_config(tmp, "turnpike.yaml", worker_port, port, admin_port, redis_port if args.redis else None)
    lua = load.post_lua(tmp)
    procs = [load.upstream(tmp, worker_port)]
    if args.redis:
        procs.append(subprocess.Popen([*load.LOAD_CPU, "redis-server", "--port", str(redis_port), "--bind",
                                       "127.0.0.1", "--save", "", "--dir", tmp], stdout=subprocess.DEVNULL))
        load.wait_port(redis_port)
    gateway = subprocess.Popen([*load.PROXY_CPU, os.path.join(load.ROOT, "target/release/turnpike"), "serve",
                                "--config", os.path.join(tmp, "turnpike.yaml")], **load.logged(tmp, "turnpike"))
    procs.append(gateway)
    path = f"/v1/agents/{load.AGENT}/chat"
    try:
        load.wait_port(worker_port)
        load.wait_port(port)
        load.run_wrk(port, path, 2, 32, lua)  # warm-up
        data = os.path.join(tmp, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-F", "199", "--call-graph", "dwarf,16384", "-p", str(gateway.pid), "-o", data,
                                 "--", "sleep", str(args.seconds)], stderr=subprocess.DEVNULL)
        result = load.run_wrk(port, path, args.seconds, 32, lua)
        perf.wait()
        script = subprocess.run(["perf", "script", "-i", data], capture_output=True, check=True).stdout
        folded = subprocess.run(["inferno-collapse-perf"], input=script, capture_output=True, check=True).stdout
        title = f"Turnpike, {'Redis' if args.redis else 'embedded'} store, {result['rps']:.0f} req/s (wrk -c32)"
        svg = subprocess.run(["inferno-flamegraph", "--minwidth", "1", "--title", title], input=folded, capture_output=True,
                             check=True).stdout
        with open(out, "wb") as f:
            f.write(svg)
        print(f"{title}: wrote {out}")
    finally:
        load.stop(procs, tmp)


if __name__ == "__main__":
    main()
