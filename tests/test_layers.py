"""The layers of DESIGN.md hold: no module imports one above it, not even inside a function, and there is no import
circle among fewstep's modules. An AST walk over fewstep/ (no imports run)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fewstep"

# Highest first. A module may import its own layer and the ones below. Every module must be placed here, so a new
# one is put on purpose (the longest matching prefix wins).
LAYERS = [
    ("front", ["fewstep", "fewstep.cli", "fewstep.speed_cli", "fewstep.recipes_cli", "fewstep.serve", "fewstep.train",
               "fewstep.bench", "fewstep.lora.cli", "fewstep.worlds.shapes.cli", "fewstep.worlds.shapes.table",
               "fewstep.worlds.shapes.train_teacher", "fewstep.worlds.shapes.evaluate",
               "fewstep.stream_cli", "fewstep.bench_stream", "fewstep.bench_openvino",
               "fewstep.worlds.shapes.tiny_vae"]),
    ("engine", ["fewstep.engine", "fewstep.stream", "fewstep.previews"]),
    ("parts", ["fewstep.lora", "fewstep.speed", "fewstep.backends", "fewstep.loading", "fewstep.singlefile",
               "fewstep.text", "fewstep.default_model", "fewstep.worlds.shapes.teacher", "fewstep.inpaint",
               "fewstep.control", "fewstep.featurecache", "fewstep.tokenmerge"]),
    ("core", ["fewstep.sampling", "fewstep.schedules", "fewstep.denoiser", "fewstep.arch", "fewstep.sources",
              "fewstep.request", "fewstep.errors", "fewstep.recipes", "fewstep.latents", "fewstep.images",
              "fewstep.tokenizers",
              "fewstep.worlds", "fewstep.worlds.shapes", "fewstep.worlds.shapes.world", "fewstep.worlds.shapes.detect",
              "fewstep.worlds.shapes.data"]),
]


def module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer_of(module):
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (len(LAYERS) - rank, prefix)
    return None if best is None else best[0]


def imports(module):
    """The fewstep modules `module` imports anywhere in its file (functions included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fewstep"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "fewstep":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES and m != module}


GRAPH = {m: imports(m) for m in MODULES}


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_import_circles():
    assert cycles(GRAPH) == []


def test_the_check_sees_function_level_and_relative_imports():
    # the walk must find what it guards against: the engine imports the lora package inside a function
    assert "fewstep.lora.adapters" in GRAPH["fewstep.engine"]
    assert "fewstep.engine" in GRAPH["fewstep"]  # fewstep.load imports it lazily
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
