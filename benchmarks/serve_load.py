"""Bounded load test of `fewstep serve` on loopback: batching against one-at-a-time, throughput and latency.

Starts the server as a child process once per mode (--max-batch 1, then --max-batch N), warms it up, then sends a
fixed number of OpenAI-dialect requests from C concurrent clients (each a different prompt and seed), stopping early
at --duration seconds. Prints one row per mode (images/s, latency p50/p90/p99, mean UNet batch from /metrics) and
the throughput ratio measured in the same run. Loopback only; nothing else is contacted.

    nice -n 19 .venv/bin/python benchmarks/serve_load.py --requests 64 --concurrency 8
"""

import argparse
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(args, max_batch):
    port = free_port()
    cmd = [sys.executable, "-m", "fewstep.cli", "serve", "--host", HOST, "--port", str(port), "--device",
           args.device, "--dtype", args.dtype, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--queue-size", str(max(64, 2 * args.concurrency)), "--timeout", str(args.duration + 60)]
    if args.model:
        cmd += ["--model", args.model]
    return launch(cmd, port), port


def launch(cmd, port, log=None, env=None):
    """Start `fewstep serve` (cmd) and wait until its /health says ready; log: a file for its output."""
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=log or subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited (rc {proc.returncode}): "
                             + (f"see {log.name}" if log else proc.stderr.read()))
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up within 300 s")
        try:
            if get(port, "/health")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.25)


def stop(proc):
    """Ctrl+C, as a user stops it; killed if it has not stopped within 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def get(port, path):
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def batch_totals(port):
    """(images, batches) so far, from the server's Prometheus histogram."""
    text = get(port, "/metrics")[1]
    total = float(re.search(r"^fewstep_batch_images_sum ([\d.e+]+)$", text, re.M).group(1))
    count = float(re.search(r"^fewstep_batch_images_count ([\d.e+]+)$", text, re.M).group(1))
    return total, count


def load(port, args, count, offset, deadline):
    """Send `count` requests from args.concurrency clients; returns (latencies of successes, errors, wall time)."""
    latencies, errors, lock = [], [], threading.Lock()
    next_index = iter(range(count))
    size = f"{args.size}x{args.size}"

    def client():
        conn = http.client.HTTPConnection(HOST, port, timeout=args.duration + 60)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            body = json.dumps({"prompt": f"a shape number {offset + i}", "seed": offset + i, "size": size,
                               "steps": args.steps, "n": 1})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            with lock:
                (latencies if r.status == 200 else errors).append(time.perf_counter() - t0 if r.status == 200
                                                                  else r.status)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - t0


def run_mode(args, name, max_batch):
    proc, port = start_server(args, max_batch)
    try:
        load(port, args, args.warmup, 10**6, time.monotonic() + args.duration)  # first calls pay one-off costs
        images0, batches0 = batch_totals(port)
        latencies, errors, wall = load(port, args, args.requests, 0, time.monotonic() + args.duration)
        images1, batches1 = batch_totals(port)
    finally:
        stop(proc)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return dict(mode=name, max_batch=max_batch, requests=len(latencies), errors=len(errors), wall_s=round(wall, 2),
                images_per_s=round(len(latencies) / wall, 3), p50_s=round(q[49], 3), p90_s=round(q[89], 3),
                p99_s=round(q[98], 3), mean_batch=round((images1 - images0) / max(1, batches1 - batches0), 2))


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model source (default: the embedded default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--requests", type=int, default=64, help="measured requests per mode (default 64)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--duration", type=float, default=120, help="at most this many seconds per mode (default 120)")
    p.add_argument("--warmup", type=int, default=8, help="requests sent before measuring (default 8)")
    p.add_argument("--max-batch", type=int, default=8, help="the batched mode's --max-batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=20, help="the server's --max-wait-ms (default 20)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    env = dict(commit=commit(), device=args.device, dtype=args.dtype, model=args.model or "fewstep-default",
               cpus=os.cpu_count(), machine=platform.machine(), size=args.size, steps=args.steps,
               concurrency=args.concurrency)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows = [run_mode(args, "one-at-a-time", 1), run_mode(args, "batched", args.max_batch)]
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"] if rows[0]["images_per_s"] else float("nan")
    print(f"throughput batched / one-at-a-time: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env, rows=rows, throughput_ratio=round(ratio, 3)), f, indent=2)


if __name__ == "__main__":
    main()
