"""The package's structure rules (docs/design.md, "Module map"), checked on its source.

* no import cycle between our modules (module-level imports; ``TYPE_CHECKING``
  blocks and imports inside functions are deferred and do not count);
* no module-level mutable state: a module-level name is never mutated, rebound
  with ``global`` or assigned through a subscript, except the one listed in
  ``KEPT_STATE`` with its reason;
* no module over ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dcp_safetensors"
MAX_LINES = 550

KEPT_STATE = {
    # async_save() without a saver queues the saves of one process group behind each
    # other (issue 20: overlapping saves hang in DCP). Queueing needs a saver that
    # outlives the call, and torch's ProcessGroup takes no attributes to hold it.
    ("dcp_safetensors.api", "_DEFAULT_SAVERS"),
    # One botocore client per process and set of S3 options, as s3fs keeps one filesystem:
    # making one costs 0.1-0.5 s of CPU, paid by every SafetensorsWriter/Reader otherwise
    # (each new checkpoint_id makes a new storage). Reset in a forked child.
    ("dcp_safetensors.storage.s3_client", "_CLIENTS"),
    ("dcp_safetensors.storage.s3_client", "_CLIENTS_LOCK"),
}

MUTATORS = {"append", "extend", "add", "update", "setdefault", "pop", "popitem", "clear", "remove", "insert", "discard"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _top_level_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Our modules ``name`` imports when it is itself imported."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)

    visit(tree.body)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _top_level_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {
            m for m in imported
            if m in modules and m != name
            and not name.startswith(m + ".")  # a package's __init__ runs before its submodules
            and not (path.name == "__init__.py" and m.startswith(name + "."))
        }
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _mutated_module_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    hits = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            hits.update(node.names)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            if isinstance(node.value, ast.Name) and node.value.id in names:
                hits.add(node.value.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            if isinstance(node.func.value, ast.Name) and node.func.value.id in names:
                hits.add(node.func.value.id)
    return hits


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_level_mutable_state(name):
    tree = ast.parse(_modules()[name].read_text())
    mutated = {n for n in _mutated_module_names(tree) if (name, n) not in KEPT_STATE}
    assert not mutated, f"{name}: module-level state changed at run time: {sorted(mutated)} (keep it on an instance)"


def test_the_state_check_sees_mutation():
    tree = ast.parse("CACHE = {}\nX = []\ndef f(k):\n    CACHE[k] = 1\n    X.append(k)\n")
    assert _mutated_module_names(tree) == {"CACHE", "X"}
    assert _mutated_module_names(ast.parse("def f():\n    global N\n    N = 1\n")) == {"N"}
    assert _mutated_module_names(ast.parse("TABLE = {1: 2}\ndef f(k):\n    return TABLE[k]\n")) == set()


def test_the_cycle_check_resolves_relative_imports():
    tree = ast.parse("from . import geometry\nfrom .files import x\nfrom ..errors import E\n")
    assert _top_level_imports(tree, "dcp_safetensors.layout.plan", False) >= {
        "dcp_safetensors.layout.geometry", "dcp_safetensors.layout.files", "dcp_safetensors.errors",
    }


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_stay_small(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by concept (docs/design.md, module map)"
