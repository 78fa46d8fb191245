"""Every stage's code dependencies in dvc.yaml are complete: the import closure of the stage's function
inside lensmith/ is covered by its `deps`, so editing shared code (preprocessing, image decoding, ...)
reruns every stage that runs it."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lensmith"


def module_file(module: str) -> Path | None:
    """lensmith.a.b -> lensmith/a/b.py or lensmith/a/b/__init__.py (None outside the package)."""
    if module != "lensmith" and not module.startswith("lensmith."):
        return None
    parts = module.split(".")
    as_file = ROOT.joinpath(*parts).with_suffix(".py")
    if as_file.is_file():
        return as_file
    as_package = ROOT.joinpath(*parts) / "__init__.py"
    return as_package if as_package.is_file() else None


def imported_modules(tree: ast.AST, current: str) -> set[str]:
    """Every lensmith module an AST imports, at any depth (function-level imports run with the stage too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = current.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from lensmith.drift import reference`
    return {m for m in found if module_file(m) is not None}


def import_closure(start: set[str]) -> set[Path]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            todo.append(".".join(parts[:i]))
        path = module_file(module)
        if path is not None:
            todo.extend(imported_modules(ast.parse(path.read_text(encoding="utf-8")), module))
    return {p for p in (module_file(m) for m in seen) if p is not None}


def stage_entry_modules() -> dict[str, set[str]]:
    """stage -> the lensmith modules its function in lensmith/stages.py imports (read from the stage table's
    `Stage(name=..., run=<function>)` rows)."""
    tree = ast.parse((PACKAGE / "stages.py").read_text(encoding="utf-8"))
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    entries = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Stage":
            fields = {k.arg: k.value for k in node.keywords}
            entries[fields["name"].value] = imported_modules(functions[fields["run"].id], "lensmith.stages")  # type: ignore[attr-defined]
    return entries


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(dep) or Path(dep) in rel.parents for dep in deps)


def test_every_stage_lists_the_code_it_runs() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    entries = stage_entry_modules()
    assert set(entries) == set(stages)
    missing = {}
    for name, modules in entries.items():
        deps = [str(d) for d in stages[name].get("deps", [])]
        lacking = sorted(str(p.relative_to(ROOT)) for p in import_closure(modules) if not covered(p, deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml stage deps lack code the stage runs: {missing}"


def test_the_closure_follows_imports_inside_functions() -> None:
    closure = {str(p.relative_to(ROOT)) for p in import_closure({"lensmith.evaluate"})}
    assert {"lensmith/evaluate.py", "lensmith/preprocess.py", "lensmith/imageio.py", "lensmith/resolve.py"} <= closure
