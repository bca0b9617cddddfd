"""The three floors, read from the source with ast (no imports run): core <- tasks <- flows.

- core (every module under quantmill/ on disk) never imports quantmill.tasks, quantmill.flows or Prefect;
- a step (quantmill.tasks.<step>, a package counting as one step) never imports another step, nor the flows;
- private task helpers (quantmill.tasks._*) are shared by the steps and import no step;
- a quantization handler (the module a registered method names) never imports another handler, and no other
  quantmill.quantize module imports a handler: what handlers share lives in common, gptq_format, gptqmodel_backend;
- quantmill.methods and quantmill.profile (what `quantmill validate` loads) never import quantmill.quantize (torch).
Lazy imports (inside functions) count: they run too. `if TYPE_CHECKING:` imports do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

FOLDERS = {"quantmill": "quantmill", "tasks": "quantmill.tasks", "flows": "quantmill.flows"}  # pyproject package-dir
PREFECT = ("prefect", "prefect_dask")
ALLOWED: set[tuple[str, str]] = set()  # (importer, imported) edges still to remove; it may only shrink (empty now)


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def imports(name: str, path: Path) -> list[tuple[list[str], int]]:
    """(candidate module names, most specific first; line) of every import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [([a.name], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            found += [([f"{base}.{a.name}", base], node.lineno) for a in node.names]  # `from pkg import module`
    return found


def floor(name: str) -> str:
    return "flows" if name.startswith("quantmill.flows") else "tasks" if name.startswith("quantmill.tasks") else "core"


def step(name: str) -> str | None:
    """quantmill.tasks.<step> of a module (None for the tasks package itself and private helpers)."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["quantmill", "tasks"] and not parts[2].startswith("_") else None


def violations(allowed: set[tuple[str, str]] = ALLOWED) -> list[str]:
    mods = modules()
    out = set()
    for name, path in mods.items():
        for candidates, line in imports(name, path):
            target = candidates[-1]
            internal = next((m for m in candidates if m in mods), None)
            where = f"{path.relative_to(REPO)}:{line}: {name} -> {internal or target}"
            if internal is None:
                if floor(name) == "core" and target.split(".")[0] in PREFECT and (name, "prefect") not in allowed:
                    out.add(f"{where} (core imports Prefect)")
                continue
            if (name, internal) in allowed:
                continue
            f, t = floor(name), floor(internal)
            if f == "core" and t != "core":
                out.add(f"{where} (core imports the {t} floor)")
            elif f == "tasks" and t == "flows":
                out.add(f"{where} (a step imports the flows)")
            elif f == "tasks" and step(internal) and step(name) != step(internal):
                out.add(f"{where} (a step imports another step)")
    return sorted(out)


SHARED = {"quantmill.quantize", "quantmill.quantize.common", "quantmill.quantize.gptq_format",
          "quantmill.quantize.gptqmodel_backend", "quantmill.quantize.sensitivity", "quantmill.quantize.run"}


def handler_modules() -> set[str]:
    """The modules registered methods name as their handlers ("package.module:function")."""
    from quantmill.methods import get_method, known_methods

    return {get_method(m).handler_ref.partition(":")[0] for m in known_methods()}


def handler_violations(handlers: set[str]) -> list[str]:
    """Imports of a handler module from another quantmill.quantize module; of quantmill.quantize from the schema."""
    mods = modules()
    out = []
    for name, path in mods.items():
        schema = name == "quantmill.profile" or name.startswith("quantmill.methods")
        if not (name.startswith("quantmill.quantize") or schema):
            continue
        for candidates, line in imports(name, path):
            internal = next((m for m in candidates if m in mods), None)
            where = f"{path.relative_to(REPO)}:{line}: {name} -> {internal}"
            if internal in handlers and internal != name and name.startswith("quantmill.quantize"):
                out.append(f"{where} (imports a handler; move what they share into a shared module)")
            elif schema and internal and internal.startswith("quantmill.quantize"):
                out.append(f"{where} (the schema imports the quantization code)")
    return sorted(out)


def test_handlers_are_independent() -> None:
    handlers = handler_modules()
    on_disk = {m for m in modules() if m.startswith("quantmill.quantize")}
    assert handlers == on_disk - SHARED, "every quantmill.quantize module is a handler or shared (SHARED)"
    found = handler_violations(handlers)
    assert not found, "quantization handlers import each other:\n" + "\n".join(found)


def test_floors() -> None:
    found = violations()
    assert not found, "imports against the floors (core <- tasks <- flows; steps independent):\n" + "\n".join(found)


def test_every_allowed_edge_still_exists() -> None:
    """ALLOWED only shrinks: an edge that is gone must leave the list."""
    stale = sorted(edge for edge in ALLOWED if not violations(ALLOWED - {edge}))
    assert not stale, f"remove from ALLOWED (no longer imported): {stale}"


def test_validate_imports_neither_prefect_nor_torch(demo_assets) -> None:
    """`quantmill validate` answers from the schema, the method configs and the input folders alone."""
    import os
    import subprocess
    import sys

    code = ("import sys; from quantmill.flows.cli import main; main(['validate', 'profiles/demo.yaml']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'prefect', 'transformers', 'mlflow'}))")
    env = {**os.environ, "QUANTMILL_DEMO": str(demo_assets.root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["profiles/demo.yaml: ok (4 recipes: rtn-w8g64, bnb-int8, bnb-nf4, dynamic-int8)",
                                       "[]"], out.stdout


if __name__ == "__main__":
    print("\n".join(violations() + handler_violations(handler_modules())) or "no violations")
