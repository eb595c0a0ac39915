"""The demo's plumbing with a tiny model (the real MiniLM demo is the README's main job)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from finetuner.backends.local import LocalBackend
from finetuner.demo import TASKS, main, run_demo
from finetuner.errors import ArgumentError
from tests.support.tiny import make_tiny_bert


@pytest.mark.parametrize('task', sorted(TASKS))
def test_demo_data_is_split_without_leaks(task: str) -> None:
    train, held_out = TASKS[task].load()

    def text(r):
        return r.text if r.text is not None else r.chunks[0].text

    assert len(train) > 100 and len(held_out) > 50
    assert not {text(r) for r in train} & {text(r) for r in held_out}  # no held-out question is trained on
    assert TASKS[task].load()[1] == held_out  # deterministic


@pytest.mark.slow
@pytest.mark.parametrize('task', sorted(TASKS))
def test_demo_runs_end_to_end_with_a_tiny_model(local: LocalBackend, tmp_path: Path, task: str) -> None:
    pytest.importorskip('finetuner_trainer.runner')
    model = make_tiny_bert(tmp_path / 'tiny-bert')
    buffer = io.StringIO()
    result = run_demo(
        model=str(model),
        task=task,
        epochs=1,
        max_items=48,
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
    assert 'mrr' in result.after
    assert result.model_path == str(tmp_path / 'out')
    assert (tmp_path / 'out' / 'manifest.json').is_file()
    assert f'Retrieval metrics of {result.run_name}' in text
    assert 'Fine-tuned model saved to' in text


def test_demo_refuses_an_unknown_task(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(['--task', 'poetry'])
    assert "invalid choice: 'poetry'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_examples_flag_prints_before_and_after_matches_after_the_metrics(
    local: LocalBackend, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip('finetuner_trainer.runner')
    monkeypatch.setenv('COLUMNS', '160')
    model = make_tiny_bert(tmp_path / 'tiny-bert')
    argv = ['--model', str(model), '--examples', '--epochs', '1', '--max-items', '48', '--batch-size', '16']
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('mine')
    with pytest.raises(ArgumentError, match=r'is not empty \(1 entries: notes\.txt\)'):  # before any training
        main([*argv, '--output', str(mine)])
    assert (mine / 'notes.txt').read_text() == 'mine'
    earlier = tmp_path / 'out'  # the model of an earlier demo is replaced
    earlier.mkdir()
    (earlier / 'manifest.json').write_text('{}')
    (earlier / 'stale.bin').write_bytes(b'old')

    code = main([*argv, '--max-length', '16', '--output', str(earlier)])
    text = capsys.readouterr().out
    assert code == 0, text
    metrics_at = text.index('Retrieval metrics of')
    before_at = text.index('Results before fine-tuning')
    after_at = text.index('Results after fine-tuning')
    assert metrics_at < before_at < after_at < text.index('Fine-tuned model saved to')
    assert text.count('Query') == 10 and ('✓' in text or '✗' in text)
    assert not (earlier / 'stale.bin').exists() and (earlier / 'README.md').is_file()
