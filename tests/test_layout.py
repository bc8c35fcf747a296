"""Product versus lab: no product module (godwit/ outside godwit/lab/) imports the lab.

The one allowed exception is ``godwit demo``: the demo ships with the CLI, so its command
imports :mod:`godwit.lab.demo` inside the command function, when the demo is run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import godwit

PACKAGE_DIR = Path(godwit.__file__).parent
LAB = "godwit.lab"
# (product module, enclosing function, imported module): lazy imports allowed on purpose.
ALLOWED = {("godwit.cli.demo", "demo", "godwit.lab.demo")}


def module_name(path: Path) -> str:
    """The dotted module name of a file under godwit/."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> list[Path]:
    lab_dir = PACKAGE_DIR / "lab"
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if lab_dir not in p.parents)


def _is_lab(name: str) -> bool:
    return name == LAB or name.startswith(f"{LAB}.")


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules ``node`` imports (``from a import b``: ``a``, or ``a.b`` for ``godwit.lab``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    if _is_lab(base):
        return [base]
    return [f"{base}.{alias.name}" for alias in node.names]


def lab_imports(source: str, module: str, is_package: bool = False) -> set[tuple[str, str, str]]:
    """(module, enclosing function or "<module>", imported lab module) for each lab import."""
    found: set[tuple[str, str, str]] = set()

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child.name
            if isinstance(child, ast.Import | ast.ImportFrom):
                names = _imported(child, module, is_package)
                found.update((module, scope, name) for name in names if _is_lab(name))
            visit(child, inner)

    visit(ast.parse(source), "<module>")
    return found


def test_the_check_catches_lab_imports() -> None:
    """Each way of importing the lab is caught (the layout test below can fail)."""
    assert lab_imports("from godwit.lab.netns import TestHost", "godwit.agent") == {
        ("godwit.agent", "<module>", "godwit.lab.netns")
    }
    assert lab_imports("import godwit.lab.testbed as tb", "godwit.agent")
    assert lab_imports("from godwit import lab", "godwit.agent")
    assert lab_imports("from godwit.lab import demo", "godwit.agent") == {
        ("godwit.agent", "<module>", "godwit.lab")
    }
    assert lab_imports("from .lab import bundles", "godwit.agent")
    assert lab_imports("from ..lab.workloads import build_memhog", "godwit.cli.demo")
    assert lab_imports("from . import lab", "godwit", is_package=True)
    assert lab_imports("def f():\n    from godwit.lab.demo import run_demo\n", "godwit.x") == {
        ("godwit.x", "f", "godwit.lab.demo")
    }
    assert not lab_imports("from godwit.labels import x\nfrom . import network", "godwit.agent")


def test_no_product_module_imports_the_lab() -> None:
    modules = product_modules()
    assert len(modules) > 20, modules  # the walk found the product
    found: set[tuple[str, str, str]] = set()
    for path in modules:
        found |= lab_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert found - ALLOWED == set(), "product modules import godwit.lab"


def test_importing_the_product_loads_no_lab_module() -> None:
    """At run time too: importing every product module leaves godwit.lab unloaded."""
    names = [module_name(p) for p in product_modules() if p.name != "__main__.py"]
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m == {LAB!r} or m.startswith({LAB + '.'!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
