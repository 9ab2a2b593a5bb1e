"""The layering of DESIGN.md, checked on the source: arrows point down only, technique folders never
import each other, technique files never import each other, and no module imports another module's
private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hookwise

ROOT = Path(hookwise.__file__).parent
TECHNIQUE_FOLDERS = {"memory", "cache", "quant", "kernels", "parallel"}
# What each lower package may import of hookwise (besides itself and errors.py).
ALLOWED = {
    "core": set(),
    "introspect": {"core"},
    "sampling": {"core"},
    **{folder: {"core", "introspect"} for folder in TECHNIQUE_FOLDERS},
}


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def _hookwise_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute dotted module, imported names) for every import of hookwise in `path`."""
    package = ["hookwise", *path.relative_to(ROOT).with_suffix("").parts]
    if package[-1] == "__init__":
        package = package[:-1]
    else:
        package = package[:-1]  # the package the module sits in
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "hookwise" or module.startswith("hookwise."):
                found.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hookwise"):
                    found.append((alias.name, []))
    return found


def _folder(path: Path) -> str | None:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else None


def _test_ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


LOWER = [p for p in _modules() if _folder(p) in ALLOWED]


@pytest.mark.parametrize("path", LOWER, ids=_test_ids(LOWER))
def test_lower_packages_import_only_what_sits_below_them(path):
    own = _folder(path)
    allowed = ALLOWED[own] | {own}
    for module, _ in _hookwise_imports(path):
        parts = module.split(".")
        if len(parts) < 2 or parts[1] == "errors":
            assert len(parts) >= 2, f"{path.name} imports the hookwise package itself (an import from above)"
            continue
        assert parts[1] in allowed, f"{path.relative_to(ROOT)} imports {module}: an arrow up or sideways"


TECHNIQUE_FILES = [p for p in _modules() if _folder(p) in TECHNIQUE_FOLDERS and not p.name.startswith("_")]


@pytest.mark.parametrize("path", TECHNIQUE_FILES, ids=_test_ids(TECHNIQUE_FILES))
def test_technique_files_do_not_import_each_other(path):
    if path.name == "__init__.py":
        return
    techniques = {p.stem for p in TECHNIQUE_FILES if p.parent == path.parent and p.name != "__init__.py"}
    for module, _ in _hookwise_imports(path):
        parts = module.split(".")
        if parts[1:2] == [path.parent.name] and len(parts) > 2:
            assert parts[2] not in techniques, f"{path.relative_to(ROOT)} imports the technique file {module}"


ALL = _modules()


@pytest.mark.parametrize("path", ALL, ids=_test_ids(ALL))
def test_no_module_imports_private_names_of_another_folder_or_technique(path):
    for module, names in _hookwise_imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if not private:
            continue
        target = module.split(".")
        same_folder = target[:2] == ["hookwise", _folder(path)] if _folder(path) else False
        target_is_machinery = target[-1].startswith("_")
        assert same_folder and target_is_machinery, (
            f"{path.relative_to(ROOT)} imports private names {private} of {module}"
        )
