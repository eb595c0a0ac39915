"""docs/RELIABILITY.md names, in every table row, a test that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / 'docs' / 'RELIABILITY.md'
TEST_REF = re.compile(r'`(tests/[\w/]+\.py)::(\w+)`')


def table_rows() -> list[str]:
    lines = DOC.read_text().splitlines()
    return [line for line in lines if line.startswith('|') and not re.match(r'^\|[-| ]+\|$', line)]


def functions_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith('test_')}


def test_every_row_names_an_existing_test() -> None:
    rows = [row for row in table_rows() if not row.startswith(('| fault |', '| family |', '| property |'))]
    assert len(rows) >= 30
    for row in rows:
        references = TEST_REF.findall(row)
        assert references, f'a row without a test: {row}'
        for path, name in references:
            assert (ROOT / path).exists(), f'{path} does not exist ({row})'
            assert name in functions_of(ROOT / path), f'{path}::{name} does not exist ({row})'


def test_every_reliability_test_module_is_in_the_doc() -> None:
    text = DOC.read_text()
    for module in ('test_bad_inputs.py', 'test_security.py', 'test_faults.py', 'test_load.py'):
        for name in sorted(functions_of(ROOT / 'tests' / 'reliability' / module)):
            if name.startswith('test_the_catalogue') or name == 'test_sdk_validates_run_names_before_any_backend_call':
                continue  # the catalogue's own count and a helper check, not a fault or input family
            assert f'{module}::{name}`' in text, f'tests/reliability/{module}::{name} is in no row of the doc'
