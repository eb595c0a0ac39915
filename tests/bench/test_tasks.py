"""The held-out tasks of bench/tasks.py: the tuning splits and the report split are different draws."""

from __future__ import annotations

import pytest

from bench.tasks import SPLIT_SEEDS, TASKS
from finetuner.api.layout import Record


def test_tuning_splits_hold_out_other_topics_than_the_report_split() -> None:
    task = TASKS['topics-unseen']
    held = {name: frozenset(r.label for r in task.split(name).held_out.queries) for name in SPLIT_SEEDS}
    assert held['dev'] != held['report'] and held['dev-2'] != held['report'] and held['dev'] != held['dev-2']
    for name in SPLIT_SEEDS:
        split = task.split(name)  # type: ignore[arg-type]
        assert not {r.label for r in split.train} & held[name]  # no class trained on and queried


def test_an_unknown_split_is_refused_with_the_names() -> None:
    with pytest.raises(ValueError, match="unknown split 'test'; use dev, dev-2 or report"):
        TASKS['topics'].split('test')  # type: ignore[arg-type]


def _pair(query: str, answer: str) -> Record:
    return Record(chunks=[Record(text=query), Record(text=answer)])


def test_the_qa_corpus_has_no_copies_although_chatterbot_corpus_repeats_pairs() -> None:
    from finetuner.offline_data import chatterbot_pairs

    _, held_pairs = chatterbot_pairs(held_out=0.2, seed=SPLIT_SEEDS['report'])
    texts = [(p.chunks[0].text, p.chunks[1].text) for p in held_pairs]
    assert len(set(texts)) < len(texts)  # the data repeats pairs
    held = TASKS['qa'].split('report').held_out
    corpus = [d.text for d in held.corpus]
    queries = [q.text for q in held.queries]
    assert len(corpus) == len(set(corpus)) and len(queries) == len(set(queries))
    # Every held-out pair is still there: its answer is relevant to its question.
    for question, answer in texts:
        assert corpus.index(answer) in held.relevant[queries.index(question)]


def test_the_gpu_quality_tier_ranks_distinct_answers_with_every_answer_of_a_question_relevant() -> None:
    from bench.gpu_quality import held_out

    held = held_out([*[_pair('q', 'a')] * 3, _pair('q', 'b'), _pair('r', 'a')])
    assert held.queries == ['q', 'r'] and held.index == ['a', 'b'] and not held.exclude_self
    assert held.relevant == [frozenset({0, 1}), frozenset({0})]
    labelled = held_out([Record(text='x', label='A'), Record(text='y', label='A')])
    assert labelled.exclude_self and labelled.relevant is None
