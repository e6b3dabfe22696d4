"""The package's layering: a module is a command or library code, never both; library code never imports a command;
nothing outside t2i_ds/paper imports paper/; nothing outside t2i_ds/demo imports the demo but the few stated below;
README's layout section names every module and package.

A command is a module with an `if __name__ == "__main__":` block (or a package's `__main__.py`); it exposes
`parse_args(argv)` and `main(argv)` so the documentation test can parse every documented command line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "t2i_ds"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def is_command(name: str) -> bool:
    if name.endswith(".__main__"):
        return True
    for node in TREES[name].body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and getattr(node.test.left, "id", None) == "__name__":
            return True
    return False


COMMANDS = sorted(n for n in MODULES if is_command(n))


def imported_modules(name: str) -> set[str]:
    """Every t2i_ds module `name` imports, at top level or inside a function (lazy imports count too)."""
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m in MODULES}


def test_commands_found():
    # the scan itself works: the main commands are seen as commands, library modules are not
    for name in ("t2i_ds.train", "t2i_ds.export", "t2i_ds.prepare", "t2i_ds.generate", "t2i_ds.eval.__main__",
                 "t2i_ds.demo.__main__", "t2i_ds.paper.align"):
        assert name in COMMANDS
    for name in ("t2i_ds.inference", "t2i_ds.sampling", "t2i_ds.data.prepare", "t2i_ds.trainer.trainer"):
        assert name not in COMMANDS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nothing_imports_a_command(name):
    bad = sorted(m for m in imported_modules(name) if m in COMMANDS and m != name)
    assert not bad, f"{name} imports the command module(s) {bad}: move what it needs into library code"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("t2i_ds.paper")))
def test_nothing_outside_paper_imports_paper(name):
    bad = sorted(m for m in imported_modules(name) if m.startswith("t2i_ds.paper"))
    assert not bad, f"{name} imports {bad}: the paper's analyses are leaves"


# The demo is a guest: it uses eval/data/model, never the other way round. The exceptions, each strictly needed:
# - commands that take an image-tokenizer spec or a run import the package `t2i_ds.demo` only, which registers the
#   `demo:DIR` kind with t2i_ds.data.image_tokenizers (a demo run's spec must resolve from a fresh shell);
# - the train command imports `t2i_ds.demo.preset` for `--preset demo`;
# - the paper's analyses are leaves themselves and run on the demo's data (t2i_ds.paper.compare_init).
DEMO_REGISTRATION = {"t2i_ds.demo"}
DEMO_IMPORTERS = {"t2i_ds.generate": DEMO_REGISTRATION, "t2i_ds.eval.__main__": DEMO_REGISTRATION,
                  "t2i_ds.prepare": DEMO_REGISTRATION, "t2i_ds.inspect_shards": DEMO_REGISTRATION,
                  "t2i_ds.train": {"t2i_ds.demo", "t2i_ds.demo.preset"}}


def is_demo(module: str) -> bool:
    return module == "t2i_ds.demo" or module.startswith("t2i_ds.demo.")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not is_demo(n) and not n.startswith("t2i_ds.paper")))
def test_nothing_outside_demo_imports_demo(name):
    bad = sorted(m for m in imported_modules(name) if is_demo(m) and m not in DEMO_IMPORTERS.get(name, set()))
    assert not bad, f"{name} imports {bad}: the demo is a guest (register through a registry, or move the code into demo/)"


def test_demo_importers_are_commands():
    assert set(DEMO_IMPORTERS) <= set(COMMANDS)  # library code never gets an exception


@pytest.mark.parametrize("name", COMMANDS)
def test_commands_expose_parse_args_and_main(name):
    defs = {n.name for n in TREES[name].body if isinstance(n, ast.FunctionDef)}
    assert {"parse_args", "main"} <= defs, f"{name} must define parse_args(argv) and main(argv)"


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))
    missing = []
    for name in MODULES:
        last = name.split(".")[-1]
        if last in ("__main__", "t2i_ds"):
            continue
        if last not in words:
            missing.append(name)
    assert not missing, f"README.md's layout section does not name {missing}"
