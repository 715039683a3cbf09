"""The package's imports point one way: no cycle between modules or between subpackages,
counting imports inside functions too (an import moved into a function to dodge a cycle is
still a cycle), leaf modules that import nothing of ours, and math that never touches
torch.distributed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, subprocess_env

PKG = REPO / "fedpeft_hpc"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every fedpeft_hpc module that ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fedpeft_hpc"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("fedpeft_hpc"):
                continue
            out.add(mod)
            for a in node.names:  # `from fedpeft_hpc.x import y` may name a submodule y
                out.add(f"{mod}.{a.name}")
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if color.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if color.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def test_no_import_cycle_between_modules():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    layers: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        layers.setdefault(_subpackage(mod), set()).update(_subpackage(d) for d in deps)
    for k in layers:
        layers[k].discard(k)
        layers[k].discard("<root>")  # the root package only re-exports load_run lazily
    cycle = _find_cycle(layers)
    assert cycle is None, "subpackage cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found_when_there_is_one():
    """The checker itself can fail."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_leaves_import_nothing_of_ours_but_errors():
    graph = _graph()
    for mod, deps in graph.items():
        if mod.startswith(("fedpeft_hpc.utils", "fedpeft_hpc.errors")):
            assert deps <= {"fedpeft_hpc.errors"}, (mod, deps)
        if mod.startswith("fedpeft_hpc.config"):
            assert all(d.startswith(("fedpeft_hpc.config", "fedpeft_hpc.utils", "fedpeft_hpc.errors"))
                       for d in deps), (mod, deps)


def _uses_torch_distributed(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed"
                                                                                for a in node.names):
            return True
        if (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
                and node.value.id == "torch"):
            return True
    return False


def test_math_never_touches_torch_distributed(tmp_path):
    for sub in ("federated", "peft", "privacy", "data", "models"):
        for path in (PKG / sub).rglob("*.py"):
            assert not _uses_torch_distributed(path), path
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nx = torch.distributed.get_rank()\n")
    assert _uses_torch_distributed(bad)


def test_importing_the_config_is_light():
    code = "import sys, fedpeft_hpc.config, fedpeft_hpc.utils.streams; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
