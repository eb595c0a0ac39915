"""The demo's plumbing with a tiny model (the real MiniLM demo is run by hand; see the README)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from finetuner.backends.local import LocalBackend
from finetuner.demo import chatterbot_pairs, run_demo, split_by_question
from tests.support.tiny import make_tiny_bert


def test_chatterbot_pairs_split_by_question_without_leaks() -> None:
    pairs = chatterbot_pairs()
    assert len(pairs) > 2000
    train, evaluation = split_by_question(pairs)
    train_questions = {r.chunks[0].text for r in train}
    eval_questions = [r.chunks[0].text for r in evaluation]
    assert len(eval_questions) == len(set(eval_questions)) > 100  # one pair per held-out question
    assert not train_questions & set(eval_questions)
    assert split_by_question(pairs)[1] == evaluation  # deterministic


@pytest.mark.slow
def test_demo_runs_end_to_end_with_a_tiny_model(local: LocalBackend, tmp_path: Path) -> None:
    pytest.importorskip('finetuner_trainer.runner')
    model = make_tiny_bert(tmp_path / 'tiny-bert')
    buffer = io.StringIO()
    result = run_demo(
        model=str(model),
        max_pairs=48,
        batch_size=16,
        max_length=16,
        output=tmp_path / 'out',
        console=Console(file=buffer, width=120),
    )
    text = buffer.getvalue()
    assert result.status['status'] == 'FINISHED', text
    assert f'Run name: {result.run_name}' in text
    assert "Run status: {'status': 'CREATED', 'details': 'Run submitted and awaits execution'}" in text
    assert result.before and set(result.before) == set(result.after)
    assert result.model_path == str(tmp_path / 'out')
    assert (tmp_path / 'out' / 'manifest.json').is_file()
    assert f'Retrieval metrics of {result.run_name}' in text
    assert 'Fine-tuned model saved to' in text
