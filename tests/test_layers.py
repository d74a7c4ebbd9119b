"""The architecture as a contract: layers import only downward, siblings of a layer not each other, and no
module imports itself back through others (no import circle), counting imports inside functions too.

    bench                        benchmarks: may drive anything
    pipelines                    assembles the stages
    eval | distill | students    each on its own config section and plain arguments
    teachers
    logit_cache | resources      the cache format; fetched resources and text
    core                         errors, deadline, processes, disk, checkpoints, hashing, the training loop
    kernels                      Triton; imports nothing of ours
"""
from __future__ import annotations

from pathlib import Path

from pipelines.code_identity import imported_modules

ROOT = Path(__file__).resolve().parents[1]
LAYERS: list[tuple[str, ...]] = [
    ("bench",),
    ("pipelines",),
    ("eval", "distill", "students"),
    ("teachers",),
    ("logit_cache", "resources"),
    ("core",),
    ("kernels",),
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


# Kept records, not modules: probe scripts run once on a GPU, verbatim beside their logs (they may drive test
# helpers such as tests.test_hf_moe's tiny models).
RECORDS = ("bench/results",)


def _modules() -> dict[str, Path]:
    """Every module of the project's packages, tests and kept records excluded, plus Python files that lm-eval
    loads by path."""
    out = {}
    for pkg in LEVEL:
        for f in (ROOT / pkg).rglob("*.py"):
            if any(f.relative_to(ROOT).as_posix().startswith(r + "/") for r in RECORDS):
                continue
            rel = f.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = f
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in imported_modules(f, m, ROOT) if i != m} for m, f in mods.items()}


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(LEVEL), f"packages without a layer in this test: {packages - set(LEVEL)}"


def test_layers_import_only_downward():
    bad = []
    for mod, deps in _graph().items():
        mine = LEVEL[mod.split(".")[0]]
        for dep in deps:
            top = dep.split(".")[0]
            if top == mod.split(".")[0]:
                continue
            if LEVEL[top] <= mine:  # upward, or a sibling of the same layer
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    graph = _graph()
    # Parent packages are imported implicitly by their submodules; an __init__ that imports its own submodules
    # (a re-export) is not a circle through them.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker behind these tests finds imports inside functions, and skips `if TYPE_CHECKING:` blocks."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "x.py").write_text("")
    f = tmp_path / "core" / "bad.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipelines.x\n"
                 "def f():\n    from pipelines import x\n")
    assert imported_modules(f, "core.bad", tmp_path) == {"pipelines", "pipelines.x"}
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipelines.x\n")
    assert imported_modules(f, "core.bad", tmp_path) == set()
