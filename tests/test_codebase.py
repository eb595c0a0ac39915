"""Rules over the source of the three packages, read with ``ast`` (nothing is imported).

- No import cycle inside ``finetuner``, ``finetuner_operator`` or ``finetuner_trainer``: the graph
  of module-level imports (what runs at import time: not function-local imports, not imports
  under ``if TYPE_CHECKING:``) has no cycle; a failure names the modules of each cycle in order.
- No function over 80 lines in ``sdk/``, ``operator/`` or ``trainer/`` (tests and bench are not
  there); a failure names each offender as ``file:line:name (n lines)``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    'finetuner': ROOT / 'sdk' / 'finetuner',
    'finetuner_operator': ROOT / 'operator' / 'finetuner_operator',
    'finetuner_trainer': ROOT / 'trainer' / 'finetuner_trainer',
}
MAX_FUNCTION_LINES = 80


# --- imports --------------------------------------------------------------------------------------


def module_files(package: str, folder: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by the name of its ``__init__``)."""
    modules = {}
    for path in sorted(folder.rglob('*.py')):
        parts = list(path.relative_to(folder).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        modules['.'.join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING'
    )


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: top level, and inside top-level
    ``if``/``try``/``with`` blocks, except an ``if TYPE_CHECKING:`` body."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            pending.extend(node.orelse if _is_type_checking(node.test) else [*node.body, *node.orelse])
        elif isinstance(node, ast.Try):
            pending.extend([*node.body, *node.orelse, *node.finalbody, *(s for h in node.handlers for s in h.body)])
        elif isinstance(node, ast.With):
            pending.extend(node.body)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ''
    base = module.split('.') if is_package else module.split('.')[:-1]
    base = base[: len(base) - (node.level - 1)]
    return '.'.join([*base, node.module] if node.module else base)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports at import time."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _absolute(node, name, path.name == '__init__.py')
                targets = [f'{source}.{a.name}' if f'{source}.{a.name}' in modules else source for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path of modules) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm; the graphs are a few dozen modules deep
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_path_through(graph, sorted(component)) for component in components]


def _path_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest closed path from the component's first module back to itself."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for other in sorted(graph[node] & members):
                if other == start:
                    return [*paths[node], start]
                if other not in paths:
                    paths[other] = [*paths[node], other]
                    following.append(other)
        frontier = following
    raise AssertionError(f'{component} is not a cycle')  # Tarjan only returns strongly connected sets


@pytest.mark.parametrize('package', sorted(PACKAGES))
def test_no_import_cycle_inside_the_package(package: str) -> None:
    found = cycles(import_graph(module_files(package, PACKAGES[package])))
    assert not found, 'import cycles (module-level imports):\n' + '\n'.join(' -> '.join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle_and_names_it(tmp_path: Path) -> None:
    folder = tmp_path / 'pkg'
    folder.mkdir()
    (folder / '__init__.py').write_text('')
    (folder / 'a.py').write_text('from pkg.b import x\n')
    (folder / 'b.py').write_text(
        'from typing import TYPE_CHECKING\nfrom . import c\nif TYPE_CHECKING:\n    import pkg.a\n'
    )
    (folder / 'c.py').write_text(
        'def f():\n    from pkg import a\ntry:\n    import pkg.b\nexcept ImportError:\n    pass\n'
    )
    graph = import_graph(module_files('pkg', folder))
    assert graph == {'pkg': set(), 'pkg.a': {'pkg.b'}, 'pkg.b': {'pkg.c'}, 'pkg.c': {'pkg.b'}}
    assert cycles(graph) == [['pkg.b', 'pkg.c', 'pkg.b']]
    (folder / 'c.py').write_text('from .a import y\n')
    assert cycles(import_graph(module_files('pkg', folder))) == [['pkg.a', 'pkg.b', 'pkg.c', 'pkg.a']]


# --- function length ------------------------------------------------------------------------------


def long_functions(folder: Path, limit: int = MAX_FUNCTION_LINES, root: Path = ROOT) -> list[str]:
    """``file:line:name (n lines)`` for every function or method longer than ``limit`` lines
    (from its ``def`` to its last line, docstring included, decorators not); files named from ``root``."""
    found = []
    for path in sorted(folder.rglob('*.py')):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    found.append(f'{path.relative_to(root)}:{node.lineno}:{node.name} ({length} lines)')
    return found


@pytest.mark.parametrize('folder', ['sdk', 'operator', 'trainer'])
def test_no_function_over_80_lines(folder: str) -> None:
    found = long_functions(ROOT / folder)
    assert not found, f'functions over {MAX_FUNCTION_LINES} lines:\n' + '\n'.join(found)


def test_the_length_rule_names_file_line_and_function(tmp_path: Path) -> None:
    body = '\n'.join(f'        x{i} = {i}' for i in range(80))
    (tmp_path / 'm.py').write_text(f'def short():\n    pass\n\n\nclass K:\n    def long(self):\n{body}\n')
    found = long_functions(tmp_path, root=tmp_path)
    assert found == ['m.py:6:long (81 lines)']
