"""The held-out tasks of bench/tasks.py: the tuning splits and the report split are different draws."""

from __future__ import annotations

import pytest

from bench.tasks import SPLIT_SEEDS, TASKS


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
