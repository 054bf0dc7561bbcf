"""fewstep on Ray Serve under a bounded load: 1 and 2 replicas against the single-process server, same run.

Each system serves the same model on loopback and gets the same load (serve_load.load: C concurrent OpenAI-dialect
clients, distinct prompts and seeds): the single server with one compute thread pinned to one core, then the Ray
app with 1 and 2 replicas, each pinned to its own core with one thread (so the replica count, not the thread count,
is what changes). Prints images/s and p50/p99 latency per row, and Ray's cost per request: the p50 of sequential
one-image requests through the 1-replica Ray app minus the single server's. Loopback only.

    nice -n 10 .venv/bin/python benchmarks/ray_load.py --requests 48 --concurrency 8
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

from serve_load import HOST, commit, free_port, launch, load, stop


def row(name, latencies, errors, wall):
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return dict(system=name, requests=len(latencies), errors=len(errors), wall_s=round(wall, 2),
                images_per_s=round(len(latencies) / wall, 3) if wall else 0.0, p50_s=round(q[49], 3),
                p99_s=round(q[98], 3))


def measure(port, args, name):
    load(port, args, args.warmup, 10**6, time.monotonic() + args.duration)
    seq = argparse.Namespace(**dict(vars(args), concurrency=1))
    solo, _, _ = load(port, seq, args.solo, 2 * 10**6, time.monotonic() + args.duration)
    r = row(name, *load(port, args, args.requests, 0, time.monotonic() + args.duration))
    r["solo_p50_s"] = round(statistics.median(solo), 4) if solo else None
    return r


def single(args):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "fewstep.cli", "serve", "--host", HOST, "--port", str(port),
           "--device", "cpu", "--dtype", args.dtype, "--queue-size", "128", "--timeout", str(args.duration + 60)]
    proc = launch(cmd, port, env=env)
    try:
        return measure(port, args, "single server (1 core)")
    finally:
        stop(proc)


def on_ray(args, replicas):
    import ray
    from ray import serve

    from fewstep.serve.ray import deployments

    port = free_port()
    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address=HOST,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": HOST, "port": port})
        t0 = time.perf_counter()
        serve.run(deployments({"model": None, "device": "cpu", "dtype": args.dtype},
                              {"queue_size": 128, "timeout": args.duration + 60}, replicas=replicas, cpus=0.5,
                              pin=True), name="fewstep", route_prefix="/")
        started = time.perf_counter() - t0
        r = measure(port, args, f"ray, {replicas} replica(s) (1 core each)")
        r["deploy_s"] = round(started, 1)
        return r
    finally:
        serve.shutdown()
        ray.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=180)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--solo", type=int, default=12, help="sequential requests for the per-request cost")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    env = dict(commit=commit(), dtype=args.dtype, cpus=os.cpu_count(), machine=platform.machine(), size=args.size,
               steps=args.steps, concurrency=args.concurrency, requests=args.requests)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows = [single(args)]
    print(rows[-1], flush=True)
    for n in [int(x) for x in args.replicas.split(",")]:
        rows.append(on_ray(args, n))
        print(rows[-1], flush=True)
    cols = ["system", "requests", "errors", "images_per_s", "p50_s", "p99_s", "solo_p50_s"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c)) for c in cols))
    base = rows[0]
    ray1 = next((r for r in rows if r["system"].startswith("ray, 1 ")), None)
    if ray1 and base["solo_p50_s"] and ray1["solo_p50_s"]:
        print(f"Ray's cost per request (sequential p50, 1 replica - single server): "
              f"{(ray1['solo_p50_s'] - base['solo_p50_s']) * 1000:.1f} ms")
    for r in rows[1:]:
        if base["images_per_s"]:
            print(f"{r['system']}: {r['images_per_s'] / base['images_per_s']:.2f}x the single server's images/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
