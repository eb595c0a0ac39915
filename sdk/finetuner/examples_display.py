"""Showing a run's example results (``Run.display_examples``): for a few evaluation queries, the top-k
matches before and after fine-tuning, each marked relevant or not.

In a terminal: rich tables, texts as text, images as their file paths (or ``<image, N bytes>`` for inline
ones). Where the caller can show pictures (a notebook's rich display), an HTML table with the images'
thumbnails; :meth:`ExampleResults._repr_html_` gives the same table when the results are a cell's value.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetuner.run import ExampleQuery, ExampleResults

RELEVANT, NOT_RELEVANT = '✓', '✗'
STAGES = (('before', 'before fine-tuning'), ('after', 'after fine-tuning'))


def check_k(k: Any) -> int:
    from finetuner.errors import ArgumentError

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArgumentError('k', f'must be a whole number of matches per query, at least 1; got {k!r}')
    return k


def tables(results: ExampleResults, k: int, run_name: str) -> list[Any]:
    """One rich Table per stage that has examples: a query row, then its k closest matches."""
    from rich.table import Table

    out = []
    for stage, title in STAGES:
        queries: list[ExampleQuery] = getattr(results, stage)
        if not queries:
            continue
        table = Table(title=f'Results {title} ({run_name}): top {k}', title_justify='left')
        for column, justify in (('', 'left'), ('rank', 'right'), ('item', 'left'), ('label', 'left')):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        table.add_column('distance', justify='right')
        table.add_column('relevant', justify='center')
        for query in queries:
            table.add_row('Query', '', query.query, _label(query.label), '', '', style='bold')
            for rank, match in enumerate(query.matches[:k], 1):
                mark = RELEVANT if match.relevant else NOT_RELEVANT
                table.add_row(
                    '', str(rank), match.content, _label(match.label), f'{match.distance:.4f}', mark, end_section=False
                )
            table.add_section()
        out.append(table)
    return out


def _label(label: Any) -> str:
    return '' if label is None else str(label)


def to_html(results: ExampleResults, k: int = 5) -> str:
    """An HTML table of the examples, images shown as their thumbnails (``data:`` URIs)."""
    parts = []
    for stage, title in STAGES:
        queries: list[ExampleQuery] = getattr(results, stage)
        if not queries:
            continue
        rows = []
        for query in queries:
            cells = [f'<td><b>{_cell(query.query, query.image)}</b></td>']
            for match in query.matches[:k]:
                mark = RELEVANT if match.relevant else NOT_RELEVANT
                style = 'color:green' if match.relevant else 'color:#b00'
                cells.append(
                    f'<td>{_cell(match.content, match.image)}<br>'
                    f'<span style="{style}">{mark}</span> {match.distance:.4f}</td>'
                )
            rows.append('<tr>' + ''.join(cells) + '</tr>')
        header = '<tr><th>query</th>' + ''.join(f'<th>#{i}</th>' for i in range(1, k + 1)) + '</tr>'
        parts.append(f'<h4>Results {title}</h4><table>{header}{"".join(rows)}</table>')
    return '\n'.join(parts) or '<p>No example results (the run did not evaluate).</p>'


def _cell(content: str, image: str | None) -> str:
    if image and image.startswith('data:image/'):
        return f'<img src="{html.escape(image, quote=True)}" title="{html.escape(content)}" width="96"/>'
    return html.escape(content)


def notebook_display() -> Any:
    """IPython's ``display`` when running in a kernel that shows rich output (Jupyter), else None."""
    import sys

    if 'IPython' not in sys.modules:
        return None
    from IPython import get_ipython  # already imported by the running shell

    shell = get_ipython()
    if shell is None or type(shell).__name__ != 'ZMQInteractiveShell':
        return None
    from IPython.display import HTML, display

    return lambda text: display(HTML(text))
