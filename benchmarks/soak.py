"""Bounded soak of `fewstep serve` at a multiple of its capacity: overload must cost 429s, never lost requests,
5xx or unbounded memory.

Starts the server (the embedded shapes model unless --model) on a free loopback port, measures its capacity
(images/s with --max-batch clients in a closed loop, after a warm-up), then sends requests open-loop at --load
times that rate (default 4x) for --duration seconds, each in its own connection, and waits for every answer.
Prints sent / 200 / 429 / 5xx / other / lost (no answer, or a broken connection), latency p50/p99 of the 200s,
and the server's RSS at the start, peak and end (sampled from /proc). Loopback only; nothing else is contacted.

    nice -n 10 .venv/bin/python benchmarks/soak.py --duration 60
"""

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from types import SimpleNamespace

from serve_load import HOST, commit, free_port, launch, load, stop


def start_server(args):
    port = free_port()
    cmd = [sys.executable, "-m", "fewstep.cli", "serve", "--host", HOST, "--port", str(port), "--device",
           args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--queue-size",
           str(args.queue_size), "--timeout", str(args.timeout)]
    if args.model:
        cmd += ["--model", args.model]
    return launch(cmd, port), port


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """The server's RSS every `every` seconds, until stopped."""

    def __init__(self, pid, every=0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.values, self.stop = pid, every, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            v = rss_mib(self.pid)
            if v is not None:
                self.values.append(v)
            self.stop.wait(self.every)


def soak(port, args, rate):
    """Open-loop: one request every 1/rate s for args.duration s; returns the outcomes."""
    outcomes, lock = [], threading.Lock()
    size = f"{args.size}x{args.size}"

    def one(i):
        body = json.dumps({"prompt": f"a shape number {i}", "seed": i, "size": size, "steps": args.steps})
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=args.timeout + 30)
            conn.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            status, retry = r.status, r.getheader("Retry-After")
            conn.close()
        except (OSError, http.client.HTTPException):
            status, retry = None, None
        with lock:
            outcomes.append((status, time.perf_counter() - t0, retry))

    threads, t0, i = [], time.monotonic(), 0
    while time.monotonic() - t0 < args.duration and i < args.max_requests:
        due = t0 + i / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        i += 1
    for t in threads:
        t.join(args.timeout + 60)
    lost = sum(t.is_alive() for t in threads)
    return outcomes, i, lost


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model source (default: the embedded default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--load", type=float, default=4.0, help="offered load as a multiple of capacity (default 4)")
    p.add_argument("--duration", type=float, default=60, help="seconds of offered load (default 60)")
    p.add_argument("--max-requests", type=int, default=5000, help="at most this many requests (default 5000)")
    p.add_argument("--capacity-requests", type=int, default=48, help="requests measuring capacity (default 48)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--timeout", type=float, default=120, help="the server's --timeout (default 120, the server's)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    print(f"commit={commit()} device={args.device} dtype={args.dtype} model={args.model or 'fewstep-default'} "
          f"cpus={os.cpu_count()} machine={platform.machine()} size={args.size} steps={args.steps} "
          f"max_batch={args.max_batch} queue_size={args.queue_size} timeout={args.timeout:g}", flush=True)
    proc, port = start_server(args)
    try:
        closed = SimpleNamespace(concurrency=args.max_batch, duration=120, size=args.size, steps=args.steps)
        load(port, closed, 8, 10**6, time.monotonic() + 120)  # warm-up: first calls pay one-off costs
        latencies, errors, wall = load(port, closed, args.capacity_requests, 10**7, time.monotonic() + 120)
        capacity = len(latencies) / wall
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} images/s ({len(latencies)} requests, {len(errors)} errors, closed loop of "
              f"{args.max_batch}); offering {rate:.2f} requests/s ({args.load:g}x) for {args.duration:g} s",
              flush=True)
        rss = Sampler(proc.pid)
        start = rss_mib(proc.pid)
        rss.start()
        outcomes, sent, lost = soak(port, args, rate)
        time.sleep(2)
        end = rss_mib(proc.pid)
        rss.stop.set()
        alive = proc.poll() is None
    finally:
        stop(proc)
    counts = {"200": 0, "429": 0, "5xx": 0, "other": 0, "lost": lost}
    for status, _, _ in outcomes:
        key = "lost" if status is None else str(status) if status in (200, 429) else "5xx" if status >= 500 else \
            "other"
        counts[key] += 1
    ok = sorted(s for status, s, _ in outcomes if status == 200)
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else ok * 99
    retry = sorted({r for status, _, r in outcomes if status == 429 and r})
    codes = {}  # every status apart from 200 and 429, by code (504: timed out in the queue)
    for status, _, _ in outcomes:
        if status not in (200, 429, None):
            codes[status] = codes.get(status, 0) + 1
    row = dict(sent=sent, **{k: counts[k] for k in ("200", "429", "5xx", "other", "lost")},
               p50_s=round(q[49], 3) if ok else None, p99_s=round(q[98], 3) if ok else None,
               rss_start_mib=round(start, 1), rss_peak_mib=round(max(rss.values or [start]), 1),
               rss_end_mib=round(end, 1) if end else None, capacity_images_per_s=round(capacity, 3),
               offered_per_s=round(rate, 3), retry_after=retry[:5], other_codes=dict(sorted(codes.items())),
               server_alive=alive)
    print(" | ".join(row))
    print(" | ".join(str(v) for v in row.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0 if counts["5xx"] == 0 and counts["lost"] == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
