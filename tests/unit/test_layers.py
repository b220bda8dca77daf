"""The package is one stack of layers and imports only run down it (README "Code map").

Every module's imports are read with ``ast`` (top-level and inside functions alike: a lazy import is still a
dependency), mapped to the layer of the module they name, and checked against the order below. Packages on
one level (stages and ppo) may not import each other. The package-level graph must also be free of cycles.
A planted upward import shows that the check catches one; a subprocess shows that the core imports without
Ray, DeepSpeed, vLLM or transformers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "unipipe_ray"

# Bottom to top. A module may import its own package and any package on a lower level.
LEVELS = (
    ("config",),            # dataclasses and the YAML reader: standard library + yaml
    ("core",),              # pure math and model-side helpers: torch (transformers only inside functions)
    ("data",),              # readers, records, tokenization, tasks, splits, the held-out set
    ("runtime",),           # training engine, checkpoints, loop helpers, Ray start, launcher, actor groups
    ("stages", "ppo"),      # the Ray Train stages; PPO's controller, roles, rollout engines, weight sync
    ("eval",),              # evaluation with statistics, active selection
    ("pipeline",),          # the chained run and its report
    ("tune",),              # Ray Tune sweeps
    ("cli",),               # the `unipipe` command
)
LEVEL_OF = {package: i for i, packages in enumerate(LEVELS) for package in packages}
HEAVY = ("ray", "deepspeed", "vllm", "transformers")


def layer_of(module: str) -> str | None:
    """unipipe_ray.core.logps -> "core"; the top package itself (or anything outside it) -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "unipipe_ray" and len(parts) > 1 else None


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, relative imports resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from unipipe_ray import core` names a package through its attribute
            out += [(node.lineno, f"{base}.{alias.name}" if base == "unipipe_ray" else base) for alias in node.names]
    return out


def package_imports(root: Path = PACKAGE, extra: dict[str, str] | None = None) -> list[tuple[str, int, str]]:
    """(importing module, line, imported module) for every import of a unipipe_ray module inside the package.
    ``extra`` ({module name: source}) adds modules that are not on disk (the planted violation below)."""
    sources = {module_name(p): (p.read_text(), p.name == "__init__.py") for p in sorted(root.rglob("*.py"))}
    sources |= {name: (text, False) for name, text in (extra or {}).items()}
    return [(name, line, target) for name, (text, is_package) in sources.items()
            for line, target in imported_modules(text, name, is_package) if target.split(".")[0] == "unipipe_ray"]


def violations(imports: list[tuple[str, int, str]]) -> list[str]:
    """Imports that run upward or sideways between layers, and imports of packages the stack does not know."""
    out = []
    for module, line, target in imports:
        src, dst = layer_of(module), layer_of(target)
        if src is None or dst is None or src == dst:
            continue
        if src not in LEVEL_OF or dst not in LEVEL_OF:
            out.append(f"{module}:{line} imports {target}: {src if src not in LEVEL_OF else dst} is in no layer")
        elif LEVEL_OF[dst] >= LEVEL_OF[src]:
            way = "sideways" if LEVEL_OF[dst] == LEVEL_OF[src] else "upward"
            out.append(f"{module}:{line} imports {target}: {src} -> {dst} runs {way}")
    return out


def cycles(imports: list[tuple[str, int, str]]) -> list[list[str]]:
    """Cycles in the graph of layer packages (an edge per import between two of them)."""
    graph: dict[str, set[str]] = {}
    for module, _, target in imports:
        src, dst = layer_of(module), layer_of(target)
        if src and dst and src != dst:
            graph.setdefault(src, set()).add(dst)
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_package_is_in_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert packages | modules == set(LEVEL_OF), "a new top-level package or module needs a layer in LEVELS"


def test_imports_only_run_down_the_stack():
    imports = package_imports()
    assert len(imports) > 100  # the walk really read the package
    assert violations(imports) == []
    assert cycles(imports) == []


def test_a_planted_upward_import_is_caught():
    """core importing the runtime (lazily, inside a function) is reported, with its line, and closes a cycle."""
    planted = "import torch\n\n\ndef f():\n    from unipipe_ray.runtime.distributed import rank\n    return rank()\n"
    imports = package_imports(extra={"unipipe_ray.core.planted": planted})
    assert violations(imports) == ["unipipe_ray.core.planted:5 imports unipipe_ray.runtime.distributed: "
                                   "core -> runtime runs upward"]
    assert ["core", "runtime", "core"] in cycles(imports)
    sideways = package_imports(extra={"unipipe_ray.stages.planted": "from ..ppo import controller\n"})
    assert violations(sideways) == ["unipipe_ray.stages.planted:1 imports unipipe_ray.ppo: stages -> ppo "
                                    "runs sideways"]


def test_the_core_imports_without_ray_deepspeed_vllm_or_transformers():
    modules = sorted({module_name(p) for p in (PACKAGE / "core").rglob("*.py")} |
                     {module_name(p) for p in (PACKAGE / "config").rglob("*.py")})
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
