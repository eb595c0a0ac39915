"""The time-to-quality benchmark (``python -m bench.ttq``): its scorer against a hand count, the tasks it
runs, the breakdown of our wall time, and the section it writes into docs/BENCHMARKS.md. The end-to-end
run on tiny models is part of ``tests/bench/test_bench_harness.py`` (``python -m bench --tiny``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import ttq, ttq_report
from bench.common import Settings
from finetuner.api.layout import Record


def _case(relevant: list[frozenset[int]], itself: list[int | None]) -> ttq.Case:
    items = [Record(text=str(i)) for i in range(len(itself))]
    return ttq.Case(
        name='t',
        title='t',
        kind='text',
        shape='labelled',
        model='m',
        model_options={'max_length': 8},
        reference_model='m',
        reference_weights=None,
        epochs=1,
        batch_size=2,
        recipe=ttq.RECIPES['text-labelled'],
        train=[],
        queries=items,
        corpus=items,
        relevant=relevant,
        itself=itself,
        seeds=(0,),
    )


def test_ndcg_at_10_leaves_the_query_itself_out_and_matches_a_hand_count() -> None:
    # Three items on a line: 0 and 1 share a label, 2 is alone. Query 0 ranks itself first (left out),
    # then 1 (relevant), then 2: DCG = 1 = ideal, nDCG 1. Query 1 ranks 0 first: nDCG 1. Query 2's relevant
    # set is item 0 only (its label's other member, as by_label would give had it a partner): 2 ranks
    # itself, then 1, then 0 -> DCG = 1/log2(3) over an ideal of 1.
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    case = _case([frozenset({1}), frozenset({0}), frozenset({0})], [0, 1, 2])
    expected = (1.0 + 1.0 + 1.0 / math.log2(3)) / 3
    assert ttq.ndcg_at_10(vectors, vectors, case) == pytest.approx(expected)


def test_ndcg_at_10_of_pairs_counts_every_relevant_document() -> None:
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    corpus = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]])  # query 0's documents: 1 and 2 (ranked 2nd, 1st)
    case = _case([frozenset({1, 2}), frozenset({0})], [None, None])
    assert ttq.ndcg_at_10(queries, corpus, case) == pytest.approx(1.0)
    swapped = _case([frozenset({0}), frozenset({1, 2})], [None, None])  # every relevant document ranked last
    idcg_two = 1 + 1 / math.log2(3)
    worst = ((1 / math.log2(4)) / 1 + (1 / math.log2(3) + 1 / math.log2(4)) / idcg_two) / 2
    assert ttq.ndcg_at_10(queries, corpus, swapped) == pytest.approx(worst)


def test_the_full_run_covers_unseen_classes_pairs_and_an_image_task(tmp_path: Path) -> None:
    cases = ttq.cases_for(Settings(mode='full', workdir=tmp_path))
    assert [c.name for c in cases] == ['topics-unseen', 'topics', 'qa', 'digits-unseen']
    by_name = {c.name: c for c in cases}
    assert by_name['topics-unseen'].unseen_classes and by_name['digits-unseen'].unseen_classes
    assert by_name['digits-unseen'].kind == 'image' and by_name['digits-unseen'].reference_weights
    assert all(c.seeds == (0, 1, 2) for c in cases)
    unseen = by_name['topics-unseen']
    assert not {r.label for r in unseen.train} & {r.label for r in unseen.corpus}  # no class in both
    qa = by_name['qa']
    assert qa.shape == 'pairs' and all(len(r.chunks) == 2 for r in qa.eval_records)
    assert len(qa.eval_records) == sum(len(r) for r in qa.relevant)
    quick = ttq.cases_for(Settings(mode='quick', workdir=tmp_path))
    assert [(c.name, c.seeds) for c in quick] == [('topics-unseen', (0,)), ('qa', (0,))]
    with pytest.raises(ValueError, match="unknown task 'nope'; the tasks are topics-unseen, topics, qa, digits"):
        ttq.cases_for(Settings(mode='full', workdir=tmp_path), ['nope'])


def _our_result() -> dict[str, object]:
    return {
        'launched': 100.0,
        'wall_s': 30.0,
        'stages': {'imported': 101.0, 'submitted': 101.5, 'finished': 128.0, 'saved': 129.0},
        'timings': {
            'start-up': 4.0,
            'model': 3.0,
            'evaluation': 2.0,
            'training': 12.0,
            'artifact': 2.0,
            'other': 1.0,
            'total': 24.0,
        },
    }


def test_our_breakdown_adds_up_to_the_wall_time() -> None:
    breakdown = ttq.our_breakdown(_our_result())
    assert breakdown['python start and import finetuner'] == pytest.approx(1.0)
    assert breakdown['fit(): check, upload, queue'] == pytest.approx(0.5)
    assert breakdown['trainer: training'] == 12.0 and 'trainer: total' not in breakdown
    assert breakdown['queue, supervisor and polling'] == pytest.approx(26.5 - 24.0)
    assert breakdown['save_model()'] == pytest.approx(1.0)
    assert sum(breakdown.values()) == pytest.approx(30.0)
    reference = ttq.reference_breakdown(
        {'launched': 0.0, 'wall_s': 10.0, 'stages': {'imported': 5.0, 'loaded': 6.0, 'trained': 9.0, 'saved': 9.5}}
    )
    assert reference == pytest.approx(
        {'python start and imports': 5.0, 'load the model': 1.0, 'train': 3.0, 'save': 0.5, 'process exit': 0.5}
    )


def _results(path: Path) -> Path:
    task = {
        'name': 'topics-unseen',
        'title': 't',
        'setting': 'question -> questions: 190 training items',
        'kind': 'text',
        'unseen_classes': True,
        'reference_name': 'sentence-transformers script',
        'pretrained': 0.51,
        'seeds': [0],
        'row': {
            'ours_s': 20.0,
            'reference_s': 25.0,
            'ratio': 0.8,
            'met': True,
            'note': '',
            'ours_ndcg': 0.62,
            'reference_ndcg': 0.6,
        },
        'breakdown': {'ours': ttq.our_breakdown(_our_result()), 'reference': {'train': 20.0, 'save': 5.0}},
    }
    data = {
        'command': 'python -m bench.ttq',
        'date': '2026-12-04 18:00 UTC',
        'runtime_s': 120.0,
        'mode': 'full',
        'machine': {'cpu': 'AMD EPYC', 'cores': 2, 'gpu': None},
        'load_average': {'start': 1.0, 'end': 1.2},
        'tasks': [task],
        'notes': [],
    }
    path.write_text(json.dumps(data))
    return path


def test_the_section_shows_the_table_and_where_the_time_goes(tmp_path: Path) -> None:
    section = ttq_report.ttq_section(_results(tmp_path / 'ttq.json'))
    assert section.startswith(ttq_report.BEGIN) and section.endswith(ttq_report.END)
    assert (
        '| topics-unseen (unseen classes) | 20.0 s | 25.0 s (sentence-transformers script) | 0.80x | 0.6200 |'
        in section
    )
    assert '| trainer: training | 12.0 |' in section and '| **wall time (median)** | **20.0** |' in section
    assert '| train | 20.0 |' in section
    assert 'Not measured yet' in ttq_report.ttq_section(tmp_path / 'absent.json')


def test_the_section_goes_before_the_gpu_section_and_is_replaced_on_a_rerun(tmp_path: Path) -> None:
    document = '# Benchmarks\n\ntable\n\n<!-- gpu-section:begin (x) -->\n## GPU\n<!-- gpu-section:end -->\n'
    first = ttq_report.replace_section(document, ttq_report.BEGIN + '\nold\n' + ttq_report.END)
    assert first.index('old') < first.index('## GPU') and first.index('table') < first.index('old')
    second = ttq_report.replace_section(first, ttq_report.BEGIN + '\nnew\n' + ttq_report.END)
    assert 'old' not in second and second.count(ttq_report.BEGIN) == 1 and '## GPU' in second
    assert ttq_report.replace_section('# B\n', 'S').endswith('S\n')


def test_benchmarks_doc_shows_the_published_time_to_quality_run() -> None:
    """docs/BENCHMARKS.md carries the section of what bench/results/ttq.json holds (the published run),
    and that run covers unseen classes, pairs and an image task, each with a breakdown of our time."""
    assert ttq_report.ttq_section() in (ttq.ROOT / 'docs' / 'BENCHMARKS.md').read_text()
    data = json.loads(ttq_report.RESULTS.read_text())
    tasks = {t['name']: t for t in data['tasks']}
    assert any(t['unseen_classes'] for t in tasks.values()) and any(t['kind'] == 'image' for t in tasks.values())
    assert len(tasks) >= 3 and all(t['breakdown']['ours'] and t['row']['ours_s'] > 0 for t in tasks.values())
