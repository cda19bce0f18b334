"""The package's import direction (docs/architecture.md): tools -> engine -> checkpoint |
config_checks | visualize -> data | modeling | evaluation | spawn -> config | compat, read from
the source of every module (no import is executed)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gfocalv2"

#: The layer of each top-level part of the package; a module may import its own layer's
#: modules and lower layers only. data and modeling are siblings that do not import each other.
LAYERS = {
    "compat": 0,
    "config": 0,
    "spawn": 1,
    "data": 1,
    "modeling": 1,
    "evaluation": 1,
    "checkpoint": 2,
    "config_checks": 2,
    "visualize": 2,
    "test_time_augmentation": 2,
    "engine": 3,
}
TOOL_LAYER = 4  # every other top-level module or package: demo, export, convert, benchmark, ...


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def _part(module_path):
    """The top-level part of the package a file belongs to (``engine``, ``demo``, ...)."""
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _layer(part):
    return LAYERS.get(part, TOOL_LAYER)


def _imported_parts(module_path):
    """The top-level parts of ``gfocalv2`` that a file imports (``None`` for
    ``import gfocalv2``)."""
    tree = ast.parse(module_path.read_text(), str(module_path))
    package = module_path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = list(base) + (node.module.split(".") if node.module else [])
                if node.module is None:  # from .. import compat
                    names = [".".join(target + [a.name]) for a in node.names]
                else:
                    names = [".".join(target)]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            split = name.split(".")
            if split[0] != "gfocalv2":
                continue
            parts.add(split[1] if len(split) > 1 else None)
    return parts


def test_the_package_is_found():
    parts = {_part(p) for p in _modules()}
    assert {"config", "compat", "data", "modeling", "engine", "demo", "export"} <= parts


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_from_higher_layers_to_lower_ones(path):
    part = _part(path)
    for imported in _imported_parts(path):
        if imported is None:  # `import gfocalv2`: the compat layer and registrations, for tools
            assert _layer(part) == TOOL_LAYER, f"{path.name} imports the gfocalv2 package itself"
            continue
        if imported == part:
            continue
        assert _layer(imported) < _layer(part), (
            f"gfocalv2/{path.relative_to(PACKAGE)} ({part}, layer {_layer(part)}) "
            f"imports {imported} (layer {_layer(imported)})"
        )


def test_config_imports_nothing_from_the_package():
    assert _imported_parts(PACKAGE / "config.py") == set()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_package_does_not_depend_on_its_examples(path):
    text = path.read_text()
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in ("digit_scenes", "projects") for n in names), path
        if isinstance(node, ast.Attribute) and node.attr == "path":
            value = node.value
            if isinstance(value, ast.Name) and value.id == "sys":
                raise AssertionError(f"{path} changes or reads sys.path")


def test_config_keys_are_defined_only_in_config_py():
    """No module but config.py adds a key to a config node (``cfg.X.Y = ...`` on a fresh key
    is what ``add_*_config`` functions did)."""
    offenders = []
    for path in _modules():
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.FunctionDef)
                and node.name.startswith("add_")
                and node.name.endswith("_config")
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}: {node.name}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get":
                owner = node.func.value
                if isinstance(owner, ast.Attribute) and owner.attr in (
                    "MODEL",
                    "TEST",
                    "INPUT",
                    "SOLVER",
                    "DATASETS",
                    "DATALOADER",
                    "GFOCAL",
                ):
                    offenders.append(
                        f"{path.relative_to(PACKAGE)}:{node.lineno}: cfg.{owner.attr}.get(...)"
                    )
    assert not offenders, offenders


TESTS = pathlib.Path(__file__).resolve().parent


def test_tests_find_their_helpers_as_a_package():
    """tests/ is a package mirroring gfocalv2/: helpers are imported as ``tests.utils.*`` (the
    repository root is on the import path through pytest.ini), never found through sys.path or
    by a bare module name, and no test module imports another."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS)
        if not (path.parent / "__init__.py").exists():
            offenders.append(f"{rel}: its folder has no __init__.py")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path":
                if isinstance(node.value, ast.Name) and node.value.id == "sys":
                    offenders.append(f"{rel}:{node.lineno}: sys.path")
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if (
                    top.startswith("test_")
                    or top in ("conftest", "digit_scenes")
                    or top.endswith("_utils")
                ):
                    offenders.append(f"{rel}:{node.lineno}: import {name}")
    assert not offenders, offenders


_SUBPROCESS_CALLS = {"run", "call", "check_call", "check_output"}


def _calls_without_timeout(path):
    """(line, call) of every subprocess.run/call/check_call/check_output and .communicate()
    without a ``timeout=`` argument in a test file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        is_subprocess = (
            func.attr in _SUBPROCESS_CALLS
            and isinstance(func.value, ast.Name)
            and func.value.id == "subprocess"
        )
        if (is_subprocess or func.attr == "communicate") and not any(
            k.arg in ("timeout", None)
            for k in node.keywords  # None: **kwargs passed on
        ):
            found.append((node.lineno, ast.unparse(func)))
    return found


def test_every_subprocess_a_test_starts_has_a_time_limit():
    """A hung child process fails its test (pytest-timeout stops the test itself) instead of
    blocking the suite."""
    tests = pathlib.Path(__file__).resolve().parent
    missing = {
        str(p.relative_to(tests)): calls
        for p in sorted(tests.rglob("*.py"))
        if (calls := _calls_without_timeout(p))
    }
    assert not missing, missing
