"""The package's layers: no module imports from a layer above its own, no stage imports another
stage's private names, and the project's own modules are imported at the top of a file only.

Layers, bottom to top (a package's modules share its layer; the package root re-exports and
stands apart):

1. core: errors, io, params, chat, batching, stats, figures, prompts;
2. sites and the trace path: sites, remote, kv_cache, interventions;
3. the model and its reads: model, reads, scoring, edits;
4. stages: measure, probing, patching, circuits, steering, detect;
5. analysis (the report);
6. the experiment;
7. cli.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "behaviorlens"
LAYERS = (
    ("core", {"errors", "io", "params", "chat", "batching", "stats", "figures", "prompts"}),
    ("sites and the trace path", {"sites", "remote", "kv_cache", "interventions"}),
    ("model and reads", {"model", "reads", "scoring", "edits"}),
    ("stages", {"measure", "measure_params", "probing", "patching", "circuits", "steering", "detect"}),
    ("analysis", {"analysis"}),
    ("experiment", {"experiment", "experiments"}),
    ("cli", {"cli"}),
)
STAGES = LAYERS[3][1]


def _layer(unit: str) -> int:
    for i, (_, units) in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"behaviorlens.{unit} belongs to no layer: add it to LAYERS")


def _imports(path: Path, package_dir: Path) -> list[tuple[str, str | None, bool]]:
    """(absolute module, imported name or None, inside a function) for each project import."""
    package = ".".join(path.relative_to(package_dir.parent).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, id(node) in inside) for a in node.names if a.name.split(".")[0] == "behaviorlens"]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            if module.split(".")[0] == "behaviorlens":
                out += [(module, a.name, id(node) in inside) for a in node.names]
    return out


def _unit(module: str, name: str | None) -> str | None:
    parts = module.split(".")
    if len(parts) > 1:
        return parts[1]
    return name  # ``from behaviorlens import x`` / ``from . import x`` at the root


def violations(package_dir: Path = PACKAGE) -> list[str]:
    """Every import that breaks the layering, as ``file: what``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if rel.parts == ("__init__.py",):
            continue
        me = rel.parts[0].removesuffix(".py")
        for module, name, in_function in _imports(path, package_dir):
            if in_function:
                found.append(f"{rel}: imports {module} inside a function")
            unit = _unit(module, name)
            if unit is None or unit == me:
                continue
            if _layer(unit) > _layer(me):
                found.append(f"{rel}: imports {module} ({LAYERS[_layer(unit)][0]}), above its layer ({LAYERS[_layer(me)][0]})")
            private = (name or "").startswith("_") or any(p.startswith("_") for p in module.split(".")[2:])
            if me in STAGES and unit in STAGES and private:
                found.append(f"{rel}: imports {module}.{name}, a private name of another stage")
    return found


def test_no_module_imports_above_its_layer_or_another_stages_private_names():
    assert violations() == []


def test_a_planted_upward_import_a_private_cross_stage_import_and_a_local_import_are_caught(tmp_path):
    copy = tmp_path / "behaviorlens"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "sites.py").write_text((copy / "sites.py").read_text() + "\nfrom .cli import main\n")
    (copy / "detect" / "examples.py").write_text((copy / "detect" / "examples.py").read_text()
                                                 + "\nfrom ..probing.sweep import _tie_groups\n")
    (copy / "reads.py").write_text((copy / "reads.py").read_text() + "\n\ndef f():\n    from .model import Model\n")
    found = sorted(set(violations(copy)) - set(violations()))
    assert found == [
        "detect/examples.py: imports behaviorlens.probing.sweep._tie_groups, a private name of another stage",
        "reads.py: imports behaviorlens.model inside a function",
        "sites.py: imports behaviorlens.cli (cli), above its layer (sites and the trace path)",
    ]
