"""The layers import one way (docs/architecture.md): a cycle or a heavy import in a low layer fails here.

ctclip_contract  ->  custom_nets, transforms, chest_phantom (never each other)  ->  workflows  ->  bundle configs

Two checks: what importing each package really loads (a fresh interpreter per package), and every import
statement in the package code, read with ``ast`` (so an import hidden inside a function counts too).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ctclip_contract", "chest_phantom", "transforms", "custom_nets", "workflows")

# what each package may import of the project's own packages
ALLOWED = {
    "ctclip_contract": set(),
    "chest_phantom": {"ctclip_contract"},
    "transforms": {"ctclip_contract"},
    "custom_nets": {"ctclip_contract"},
    "workflows": {"ctclip_contract", "transforms", "custom_nets", "chest_phantom"},
}
# third-party modules that must not come along when the package is imported
FORBIDDEN_THIRD_PARTY = {
    "ctclip_contract": {"torch", "monai", "transformers", "ignite", "numpy", "nibabel", "itk"},
    "chest_phantom": {"torch", "monai", "transformers", "ignite"},
}
# third-party modules the package's own code must not import (MONAI itself loads transformers, so for transforms
# this is read from the source, not from sys.modules): the data side gets the tokenizer handed in
FORBIDDEN_IN_SOURCE = {"transforms": {"transformers"}}
# the only imports allowed inside a function: optional extras, each named where it is imported
OPTIONAL_EXTRAS = {"matplotlib", "sklearn", "onnx", "onnxscript", "monailabel"}


def _loaded_top_level(package: str) -> set[str]:
    code = f"import sys, json, {package}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_a_package_loads_only_the_layers_below(package):
    loaded = _loaded_top_level(package)
    own = (loaded & set(PACKAGES)) - {package}
    assert own <= ALLOWED[package], f"importing {package} loads {sorted(own - ALLOWED[package])}"
    heavy = loaded & FORBIDDEN_THIRD_PARTY.get(package, set())
    assert not heavy, f"importing {package} loads {sorted(heavy)}"


def _imports(path: Path):
    """``(module, inside_function, line)`` of every import statement of a file (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            yield name, id(node) in nested, node.lineno


def _package_files():
    for package in PACKAGES:
        root = ROOT / package
        if root.is_dir():
            yield from ((package, p) for p in sorted(root.rglob("*.py")))


def test_no_import_statement_crosses_a_layer_upwards():
    wrong = []
    for package, path in _package_files():
        for module, _, line in _imports(path):
            top = module.split(".")[0]
            if (top in PACKAGES and top != package and top not in ALLOWED[package]) or \
                    top in FORBIDDEN_IN_SOURCE.get(package, ()):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_imports_sit_at_module_level_except_optional_extras():
    hidden = []
    for _, path in _package_files():
        for module, inside, line in _imports(path):
            if inside and module.split(".")[0] not in OPTIONAL_EXTRAS:
                hidden.append(f"{path.relative_to(ROOT)}:{line} imports {module} inside a function")
    assert not hidden, "\n".join(hidden)


def test_the_checks_see_a_violation(tmp_path):
    """The checks could fail: an upward import written into a contract file is found."""
    bad = ROOT / "ctclip_contract" / "_layering_probe.py"
    bad.write_text("def f():\n    import custom_nets\n", encoding="utf-8")
    try:
        found = list(_imports(bad))
    finally:
        bad.unlink()
    assert found == [("custom_nets", True, 2)]
