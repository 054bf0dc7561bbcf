"""Time to the first image: N fresh `fewstep generate PROMPT` processes with the embedded default model.

    .venv/bin/python benchmarks/first_image.py [--runs 5] [--tree base=/tmp/fewstep-base --tree new=.]
        [--variant one-thread:OMP_NUM_THREADS=1] [--env ATEN_CPU_CAPABILITY=avx2 ...] [--pyc] [--floor]
        [-- extra generate flags]

Two kinds of run, alternated (each tree in turn, so drift hits all alike):
- plain: the user's command exactly (`fewstep generate PROMPT --out X.png --json -q`): wall seconds and the
  process's user + system CPU seconds (from wait4). These are the headline figures.
- breakdown: the same command in a child under `python -X importtime` with timers around fewstep's phases:
  interpreter start, imports by package (importtime's self times, which inflate them ~10%), then the load and its
  parts (components read, placing, the fast path, the LCM-LoRA; imports done inside each are counted apart),
  generation, PNG save.
Medians of N. The CPU flags and the load average (before and after) are printed: other processes on a small
machine inflate every figure, the wall more than the CPU time. A tree is a checkout put first on PYTHONPATH (a
baseline is `git archive HEAD | tar -x -C /tmp/fewstep-base`); `--pyc` lets Python write fewstep's bytecode
(PYTHONDONTWRITEBYTECODE unset) as a pip install would have it.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle in the top left on a blue background"
CONSOLE = "import sys; from fewstep.cli import main; sys.exit(main())"  # what the `fewstep` console script runs
GROUPS = ("torch", "diffusers", "transformers", "fewstep", "peft", "accelerate", "sympy")
# phases: (module, attribute, label); wrapped in the child as their modules load
PHASES = [("fewstep.engine", "load", "load"), ("fewstep.loading", "read_components", "load: read components"),
          ("fewstep.loading", "read_shipped", "load: read components"),
          ("fewstep.loading", "place", "load: place"), ("fewstep.engine", "build_fast_path", "load: fast path"),
          ("fewstep.engine", "Engine.load_lora", "load: LCM-LoRA"), ("fewstep.engine", "Engine.run", "generate"),
          ("fewstep.images", "save_png", "save PNG")]


# ---- the child: one `fewstep generate` with timers --------------------------------------------------------------

def child(record_path, argv):
    t_start = time.time()
    import builtins
    import importlib
    import importlib.abc

    imports = [0.0]
    depth = [0]

    def counted(fn):
        def inner(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                imports[0] += time.perf_counter() - t
                depth[0] -= 1
        return inner

    builtins.__import__ = counted(builtins.__import__)
    importlib.import_module = counted(importlib.import_module)
    phases = {}

    def timer(fn, label):
        def inner(*a, **k):
            t, i0 = time.perf_counter(), imports[0]
            try:
                return fn(*a, **k)
            finally:
                wall, imp = time.perf_counter() - t, imports[0] - i0
                old = phases.get(label, (0.0, 0.0))
                phases[label] = (old[0] + wall, old[1] + imp)
        return inner

    wanted = {}
    for mod, attr, label in PHASES:
        wanted.setdefault(mod, []).append((attr, label))

    class Hook(importlib.abc.MetaPathFinder):
        """Wraps the phase functions of a fewstep module right after the module runs."""

        def find_spec(self, name, path, target=None):
            if name not in wanted:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                for attr, label in wanted[name]:
                    owner, _, fn_name = attr.rpartition(".")
                    holder = getattr(module, owner) if owner else module
                    if hasattr(holder, fn_name):  # an older tree may lack one (read_shipped)
                        setattr(holder, fn_name, timer(getattr(holder, fn_name), label))

            spec.loader.exec_module = exec_module
            return spec

    import importlib.util

    sys.meta_path.insert(0, Hook())
    from fewstep.cli import main

    t_main = time.perf_counter()
    i_main = imports[0]
    code = main(argv)
    end = time.perf_counter()
    record = dict(start=t_start, main=end - t_main, main_imports=imports[0] - i_main, pre_main=t_main,
                  imports=imports[0], phases=phases, code=code, end=time.time())
    Path(record_path).write_text(json.dumps(record))
    return code


# ---- the parent ---------------------------------------------------------------------------------------------------

def cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    model = re.search(r"^model name\s*:(.*)$", text, re.M)
    keep = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma") if f in flags]
    return f"{model.group(1).strip() if model else '?'}; {os.cpu_count()} CPUs; {' '.join(keep)}"


def environment(tree, extra_env, pyc):
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(Path(tree).resolve()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                                         else "")
    if pyc:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra_env)
    return env


def generate_args(out, extra):
    return ["generate", PROMPT, "--out", str(out), "--json", "-q", *extra]


def plain_run(env, out, extra):
    """One `fewstep generate`: wall, and the CPU time of that process alone (fork + wait4: Popen would reap it)."""
    t0 = time.perf_counter()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: stdout into the pipe, stderr dropped
        os.close(read)
        os.dup2(write, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.chdir(out.parent)  # `python -c` puts the working folder first on sys.path: not a checkout's
        os.execve(sys.executable, [sys.executable, "-c", CONSOLE, *generate_args(out, extra)], env)
    os.close(write)
    with os.fdopen(read) as f:
        stdout = f.read()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"fewstep generate failed (exit {os.waitstatus_to_exitcode(status)}); run it by hand to see why")
    report = json.loads(stdout)
    return dict(wall=wall, cpu=usage.ru_utime + usage.ru_stime, user=usage.ru_utime,
                load_seconds=report["load_seconds"], generation=report["timings"][0]["total"])


def import_groups(stderr):
    """Self seconds of every imported module under -X importtime, summed by top-level package."""
    groups = dict.fromkeys((*GROUPS, "other"), 0.0)
    for m in re.finditer(r"^import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)$", stderr, re.M):
        top = m.group(2).split(".")[0]
        groups[top if top in groups else "other"] += int(m.group(1)) / 1e6
    return groups


def breakdown_run(env, out, extra):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        record_path = f.name
    launch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", __file__, "--child", record_path, "--",
                           *generate_args(out, extra)], env=env, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"breakdown child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rec = json.loads(Path(record_path).read_text())
    os.unlink(record_path)
    row = {"wall (under importtime)": wall, "interpreter start": rec["start"] - launch}
    for group, seconds in import_groups(proc.stderr).items():
        row[f"imports: {group}"] = seconds
    row["imports (all, counted)"] = rec["imports"]
    load = rec["phases"].get("load", (0.0, 0.0))
    for label, (secs, imp) in rec["phases"].items():
        row[label] = secs
        if label.startswith("load") and imp > 0.005:
            row[f"{label} (imports inside)"] = imp
    row["load without imports"] = load[0] - load[1]
    return row


# --floor: what the model classes' imports cost with parts of what they pull in hidden (a None in sys.modules makes
# importlib.util.find_spec, hence diffusers' and transformers' "is it installed" checks, say no). Measurement only:
# fewstep hides nothing. torch._dynamo cannot be hidden this way: torch.compiler.disable, which decorates diffusers'
# hook classes at import, imports it.
MODEL_IMPORTS = ("from diffusers import UNet2DConditionModel, AutoencoderKL; "
                 "from transformers import CLIPTextModel, CLIPTokenizer")
FLOOR = {"torch alone": "import torch", "model classes, as installed": MODEL_IMPORTS,
         "model classes, no scipy": "sys.modules['scipy'] = None; " + MODEL_IMPORTS,
         "model classes, no peft": "sys.modules['peft'] = None; " + MODEL_IMPORTS,
         "model classes, neither": "sys.modules['scipy'] = sys.modules['peft'] = None; " + MODEL_IMPORTS}


def cpu_of(code, env, cwd):
    """(CPU seconds, wall seconds) of `python -c code` in a fresh process."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-c", "import sys; " + code], env)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"failed: {code}")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - t0


def floor(runs, env):
    rows = {name: [] for name in FLOOR}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            for name, code in FLOOR.items():
                rows[name].append(cpu_of(code, env, tmp))
    base = statistics.median(c for c, _ in rows["model classes, as installed"])
    print(f"imports alone (medians of {runs}; CPU seconds of the process, interpreter start included)")
    for name, got in rows.items():
        cpu = statistics.median(c for c, _ in got)
        print(f"  {name:32s} cpu {cpu:6.2f}s  wall {statistics.median(w for _, w in got):6.2f}s"
              f"  ({cpu - base:+.2f}s vs as installed)")


def median_rows(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}


def commit(tree):
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "no git"
    return (head + (" + uncommitted changes" if dirty else "")) if head else "no git"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a fewstep checkout to measure (first on PYTHONPATH); repeat to alternate several")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set in the runs' environment")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="also run the last --tree with these environment variables (e.g. one:OMP_NUM_THREADS=1)")
    ap.add_argument("--pyc", action="store_true", help="let Python write fewstep's bytecode (as a pip install has)")
    ap.add_argument("--no-breakdown", action="store_true", help="plain runs only")
    ap.add_argument("--floor", action="store_true", help="only time the model classes' imports, with scipy and "
                                                         "peft hidden in turn (what they add when installed)")
    ap.add_argument("extra", nargs="*", help="more `fewstep generate` flags (after --)")
    args = ap.parse_args()
    trees = [(name, path, {}) for name, path in (t.split("=", 1) for t in args.tree)] or [("this", str(ROOT), {})]
    for v in args.variant:
        name, _, pairs = v.partition(":")
        trees.append((name, trees[len(args.tree) - 1 if args.tree else 0][1],
                      dict(p.split("=", 1) for p in pairs.split(","))))
    extra_env = dict(e.split("=", 1) for e in args.env)
    import torch

    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads; env {extra_env or '-'}"
          f"; bytecode {'written' if args.pyc else 'as the environment says'}"
          f" (PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')})")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.floor:
        floor(args.runs, environment(trees[-1][1], extra_env | trees[-1][2], args.pyc))
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    plain = {name: [] for name, _, _ in trees}
    broken = {name: [] for name, _, _ in trees}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "first.png"
        for name, tree, own in trees:  # one unmeasured run each: the page cache holds the files as for a second run
            plain_run(environment(tree, extra_env | own, args.pyc), out, args.extra)
        for i in range(args.runs):
            for name, tree, own in trees:
                env = environment(tree, extra_env | own, args.pyc)
                plain[name].append(plain_run(env, out, args.extra))
                if not args.no_breakdown:
                    broken[name].append(breakdown_run(env, out, args.extra))
                print(f"  run {i + 1} {name}: wall {plain[name][-1]['wall']:.2f}s cpu {plain[name][-1]['cpu']:.2f}s",
                      file=sys.stderr, flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    names = [name for name, _, _ in trees]
    print(f"\nmedians of {args.runs} fresh processes; trees: "
          + ", ".join(f"{n}={t} ({commit(t)}{', ' + str(own) if own else ''})" for n, t, own in trees))
    table = {n: median_rows(plain[n]) for n in names}
    keys = ["wall", "cpu", "user", "load_seconds", "generation"]
    print(f"{'plain `fewstep generate`':34s}" + "".join(f"{n:>12s}" for n in names))
    for k in keys:
        print(f"  {k:32s}" + "".join(f"{table[n][k]:11.3f}s" for n in names))
    if not args.no_breakdown:
        table = {n: median_rows(broken[n]) for n in names}
        print(f"{'breakdown (-X importtime child)':34s}" + "".join(f"{n:>12s}" for n in names))
        for k in dict.fromkeys(k for n in names for k in table[n]):
            print(f"  {k:32s}" + "".join(f"{table[n].get(k, 0.0):11.3f}s" for n in names))
    if len(names) > 1:
        base = median_rows(plain[names[0]])
        for n in names[1:]:
            new = median_rows(plain[n])
            print(f"{n} vs {names[0]}: wall {base['wall'] / new['wall']:.2f}x, cpu {base['cpu'] / new['cpu']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[sys.argv.index("--") + 1:]))
    main()
