"""Real fine-tuning runs (a tiny random timm CNN on scikit-learn's handwritten digits) seen in the console:
example results ranked by the fine-tuned model, real curves and pictures in Chromium. With
FINETUNER_CONSOLE_SCREENSHOTS=docs/console the test saves the pictures of docs/CONSOLE.md."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import finetuner
from finetuner.api.layout import Record
from tests.cluster.harness import wait_for
from tests.console.conftest import SCREENSHOTS, screenshot, serving
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS

pytest.importorskip('starlette', reason="the console extra is not installed: pip install 'kube-finetuner[console]'")
pytest.importorskip('finetuner_trainer.runner')

FIT: dict[str, Any] = {
    'model': TINY_TIMM,
    'model_options': TINY_TIMM_OPTIONS,
    'epochs': 3,
    'batch_size': 20,
    'cpu': True,
    'num_workers': 0,
    'experiment_name': 'digits',
}


def digits(per_class: int, offset: int) -> list[Record]:
    """Handwritten digits as 32-pixel PNGs, classes interleaved (the first queries show several digits)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    by_class = [np.flatnonzero(data.target == label)[offset : offset + per_class] for label in range(10)]
    records = []
    for position in range(per_class):
        for label in range(10):
            pixels = (255 - data.images[by_class[label][position]] * 255 / 16).astype('uint8')
            picture = Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert('RGB')
            out = io.BytesIO()
            picture.save(out, format='PNG')
            records.append(Record(blob=base64.b64encode(out.getvalue()).decode(), label=str(label)))
    return records


def expected_top(model: Any, records: list[Record], query: int, k: int) -> list[tuple[str, float]]:
    """(label, cosine distance) of the k nearest other items: the ranking of the saved model itself."""
    embeddings = finetuner.encode(model, records)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distances = 1.0 - unit @ unit[query]
    distances[query] = np.inf  # a query never matches itself
    order = np.argsort(distances, kind='stable')[:k]
    return [(str(records[j].label), float(distances[j])) for j in order]


@pytest.mark.slow
def test_real_runs_in_the_console(browser: Any, local: Any, tmp_path: Path) -> None:
    train, evaluation = digits(8, 0), digits(4, 20)
    runs = [
        finetuner.fit(train_data=train, eval_data=evaluation, learning_rate=lr, run_name=name, **FIT)
        for name, lr in (('digits-slow', 1e-4), ('digits-fast', 3e-3))
    ]
    for run in runs:
        assert run.wait(timeout=600, poll=0.5)['status'] == 'FINISHED', run.logs()

    # The "after" lists are the fine-tuned model's own ranking of the evaluation items.
    fast = runs[1]
    examples = fast.example_results()
    assert len(examples.before) == len(examples.after) == 5
    assert [q.label for q in examples.after] == ['0', '1', '2', '3', '4']
    model = finetuner.get_model(fast.save_model(tmp_path / 'model'))
    for index, query in enumerate(examples.after):
        expected = expected_top(model, evaluation, index, len(query.matches))
        assert [m.label for m in query.matches] == [label for label, _ in expected]
        np.testing.assert_allclose([m.distance for m in query.matches], [d for _, d in expected], atol=1e-4)
        assert [m.relevant for m in query.matches] == [m.label == query.label for m in query.matches]
        assert query.image.startswith('data:image/jpeg;base64,') and all(m.image for m in query.matches)
    assert examples.before != examples.after  # the model before fine-tuning ranked otherwise

    with serving(local) as url:
        if SCREENSHOTS:  # the runs page of the docs shows a run still training
            longer = {**FIT, 'epochs': 30, 'experiment_name': 'long-runs'}
            extra = finetuner.fit(train_data=train, eval_data=evaluation, run_name='digits-long', **longer)
            wait_for(lambda: (extra.progress() or None) and extra.progress().step >= 3, timeout=300, what='digits-long')
            browser.get(url)
            screenshot(browser, 'runs')
            extra.cancel()
        browser.get(f'{url}/runs/digits-fast')
        sizes = browser.execute_script(
            "return Array.from(document.querySelectorAll('.example img')).map(i => i.complete ? i.naturalWidth : 0)"
        )
        assert len(sizes) == 5 * 11 and set(sizes) == {32}  # 5 queries, 5 matches before and after
        series = "Array.from(document.querySelectorAll('svg.chart g.series'))"
        points = browser.execute_script(f'return {series}.map(g => [g.dataset.name, +g.dataset.points])')
        assert dict(points)['train loss'] == 12 and dict(points)['mrr'] == 4  # every step; before + 3 epochs
        screenshot(browser, 'run')
        browser.get(f'{url}/experiments/digits')
        best = browser.execute_script("return document.querySelector('a.best-run').textContent")
        assert best == max(runs, key=lambda r: r.metrics().after['mrr']).name
        screenshot(browser, 'experiment')
