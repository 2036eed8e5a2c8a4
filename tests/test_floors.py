"""The import floors of DESIGN.md: a file imports only from lower floors (or its own package; the
single-file helpers of floor 0 from one another),
and no file imports from this package inside a function (a lazy import written to dodge a
cycle means something sits on the wrong floor). Lazy imports of third-party packages (peft,
bitsandbytes, matplotlib, jsonargparse) stay allowed: they keep start-up fast."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = "dpo_lightning"
#: each group (the first name under dpo_lightning/) and its floor, lowest first
FLOORS: dict[str, int] = {
    **dict.fromkeys(("", "contract", "models", "lora", "metrics", "optim", "export", "model_card", "checkpoints",
                     "fingerprints", "experiments", "console", "digests", "run_logs", "decoding",
                     "kv_cache", "shared_prefix"), 0),
    **dict.fromkeys(("losses", "data"), 1),
    "judges": 2,
    "generation": 3,
    "modules": 4,
    **dict.fromkeys(("iterative", "callbacks", "cli", "sampling", "scoring", "plotting", "api"), 5),
    "help_cache": 6,
    "__main__": 7,
}
#: package imports inside a function that dodge no cycle, each with its reason
LAZY: dict[tuple[str, str], str] = {
    ("dpo_lightning", "dpo_lightning.api"): "PEP 562: `from dpo_lightning import train` loads the top-floor API on "
                                            "first use, so `import dpo_lightning` stays light",
    ("dpo_lightning.help_cache", "dpo_lightning.cli"): "a cached `dpo-lightning fit --help` prints without "
                                                       "importing the CLI (and with it Lightning and torch)",
}


def module_name(path: Path) -> str:
    """``dpo_lightning/modules/online.py`` -> ``dpo_lightning.modules.online``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    """The first name under the package (``""`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    """The modules of this package an import statement names (absolute names)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    if node.module is None:  # from . import a, b: the submodules
        return [f"{target}.{a.name}" for a in node.names]
    return [target]


def top_level(tree: ast.Module) -> set[ast.AST]:
    """Statements run at import time (module body, and inside its if / try blocks)."""
    out: set[ast.AST] = set()
    for statement in tree.body:
        out.add(statement)
        if isinstance(statement, (ast.If, ast.Try)):
            out.update(ast.walk(statement))
    return out


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import that breaks the floors: ``sources`` maps a module name to its source text
    and whether it is a package ``__init__``."""
    found = []
    for module, (text, is_package) in sorted(sources.items()):
        tree = ast.parse(text)
        run_at_import = top_level(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported(node, module, is_package):
                if node not in run_at_import and (module, target) not in LAZY:
                    found.append(f"{module}:{node.lineno} imports {target} inside a function")
                    continue
                mine, theirs = group(module), group(target)
                if mine not in FLOORS or theirs not in FLOORS:
                    continue  # reported by test_every_file_of_the_package_has_a_floor
                if FLOORS[mine] == FLOORS[theirs] == 0 or (module, target) in LAZY:
                    continue  # the single-file helpers (and the package's __init__) may use one another
                if mine != theirs and FLOORS[theirs] >= FLOORS[mine]:
                    found.append(f"{module}:{node.lineno} ({mine}, floor {FLOORS[mine]}) imports {target} "
                                 f"({theirs}, floor {FLOORS[theirs]})")
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py") for p in (ROOT / PACKAGE).rglob("*.py")}


def test_every_file_of_the_package_has_a_floor() -> None:
    missing = sorted({group(m) for m in package_sources()} - FLOORS.keys())
    assert missing == [], f"give {missing} a floor in tests/test_floors.py FLOORS (a single-file helper: 0)"


def test_nothing_imports_sideways_or_upward_nor_inside_a_function() -> None:
    assert violations(package_sources()) == []


def test_losses_and_data_never_import_modules() -> None:
    imports = {
        target
        for module, (text, is_package) in package_sources().items() if group(module) in ("losses", "data")
        for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.Import, ast.ImportFrom))
        for target in imported(node, module, is_package)
    }
    assert imports and not [t for t in imports if group(t) in ("modules", "judges", "generation", "iterative", "cli")]


def test_the_floor_check_catches_an_upward_import_and_a_cycle_dodge() -> None:
    sources = {
        "dpo_lightning.judges": ("from .modules.online import form_pairs\n", False),
        "dpo_lightning.generation": ("def f():\n    from .sampling import load_scorer\n", False),
        "dpo_lightning.losses.dpo": ("from ..data import collator\nfrom . import base\n", False),
        "dpo_lightning.plotting": ("def draw():\n    import matplotlib\n", False),
        "dpo_lightning": ("from .console import quiet_libraries\n", True),
    }
    assert violations(sources) == [
        "dpo_lightning.generation:2 imports dpo_lightning.sampling inside a function",
        "dpo_lightning.judges:1 (judges, floor 2) imports dpo_lightning.modules.online (modules, floor 4)",
        "dpo_lightning.losses.dpo:1 (losses, floor 1) imports dpo_lightning.data (data, floor 1)",
    ]
