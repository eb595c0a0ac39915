"""Quality on held-out tasks: the pretrained model, this project's default recipe and sentence-transformers.

The tasks are :mod:`bench.tasks` (their ``report`` split; recipes are tuned on the ``dev`` split only).
For each task and training seed, both sides fine-tune the same pretrained model on the same records with
the same epochs, batch size and input size:

- this project: ``finetuner_trainer.train`` with a spec that names only the model, the data, the budget and
  the seed, so loss, miner, sampler, learning rate and schedule are the trainer's defaults for the data's
  shape (docs/RECIPES.md); the artifact is read back with ``finetuner.get_model`` / ``finetuner.encode``;
- sentence-transformers: its own ``SentenceTransformerTrainer`` with its usual loss for the shape
  (``BatchAllTripletLoss`` over label-grouped batches for labelled items, ``MultipleNegativesRankingLoss``
  over no-duplicate batches for pairs) and its default learning rate and schedule (5e-5, linear decay);
  images through a sentence-transformers module around the same timm backbone and transform.

Every held-out query ranks the corpus by cosine similarity (itself left out); nDCG@10, MAP@10 and MRR@10
are computed by :func:`score` (checked against sentence-transformers' ``InformationRetrievalEvaluator``
in tests/bench). The table shows medians over the training seeds.

``python -m bench.quality --task NAME --split dev`` runs one task on the dev split (what tuning may
look at); ``--set field=JSON`` overrides a field of this project's spec.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import ours, st_reference
from bench.common import Row, Settings
from bench.tasks import TASKS, Budget, HeldOut, RetrievalTask, SplitName, TaskSplit, by_label, by_pair
from finetuner.api.layout import Record

BENCHMARK = 'quality'
K = 10
METRICS = (('ndcg_at_k', 'nDCG@10'), ('map', 'MAP@10'), ('mrr', 'MRR@10'))
SIDES = ('pretrained', 'ours', 'sentence-transformers')


def score(query_embeddings: Any, corpus_embeddings: Any, held: HeldOut, k: int = K) -> dict[str, float]:
    """Mean nDCG@k, MAP@k and MRR@k of ranking the corpus by cosine similarity for every query (the query
    itself left out of its own ranking)."""
    import torch

    from finetuner_trainer.evaluation import ranking_metrics

    queries = torch.nn.functional.normalize(torch.as_tensor(query_embeddings).float(), dim=-1)
    corpus = torch.nn.functional.normalize(torch.as_tensor(corpus_embeddings).float(), dim=-1)
    similarity = queries @ corpus.T
    for i, itself in enumerate(held.itself):
        if itself is not None:
            similarity[i, itself] = float('-inf')
    excluded = 1 if any(itself is not None for itself in held.itself) else 0
    top = similarity.topk(min(k, corpus.shape[0] - excluded), dim=1)
    totals = dict.fromkeys(('ndcg_at_k', 'map', 'mrr'), 0.0)
    for i, ranked in enumerate(top.indices.tolist()):
        metrics = ranking_metrics([int(j in held.relevant[i]) for j in ranked], len(held.relevant[i]))
        totals['ndcg_at_k'] += metrics['ndcg_at_k']
        totals['map'] += metrics['average_precision']
        totals['mrr'] += metrics['reciprocal_rank']
    return {key: value / len(held.queries) for key, value in totals.items()}


# ---------------------------------------------------------------------------------------------
# The three sides
# ---------------------------------------------------------------------------------------------


def model_options(task: RetrievalTask) -> dict[str, Any]:
    options = task.budget.model_options()
    if task.model.startswith('timm:test_'):  # the test suite's tiny CNNs have no pretrained weights
        options['pretrained'] = False
    return options


def pretrained_embedder(task: RetrievalTask, settings: Settings) -> Any:
    """The task's model before fine-tuning, as this project's embedder (the same pooling and preprocessing as
    both fine-tuned sides start from)."""
    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.models import build_embedder

    spec = FinetuneRunSpec(model=task.model, train_data='file:///unused.jsonl', model_options=model_options(task))
    return build_embedder(spec).to(settings.device)


def pretrained(task: RetrievalTask, held: HeldOut, settings: Settings, model: Any = None) -> dict[str, float]:
    """The metrics of the model before fine-tuning (``model``: its :func:`pretrained_embedder`, when the
    caller has it already)."""
    model = model if model is not None else pretrained_embedder(task, settings)
    return score(model.embed(held.queries), model.embed(held.corpus), held)


def train_ours(
    task: RetrievalTask, split: TaskSplit, seed: int, settings: Settings, overrides: dict[str, Any]
) -> dict[str, float]:
    """Fine-tune with the trainer's defaults for the data (plus ``overrides``); the held-out metrics."""
    import finetuner

    name = f'quality-{task.name}-{seed}-{time.monotonic_ns()}'
    fields: dict[str, Any] = {
        'epochs': task.budget.epochs,
        'batch_size': task.budget.batch_size,
        'model_options': model_options(task),
        'device': settings.device,
        'seed': seed,
        **overrides,
    }
    spec = ours.spec_for(task.model, split.train, settings.workdir, name, **fields)
    result = ours.train_run(spec, settings.workdir, name)
    model = finetuner.get_model(Path(result.artifact_uri.removeprefix('file://')), device=settings.device)
    held = split.held_out
    return score(finetuner.encode(model, held.queries), finetuner.encode(model, held.corpus), held)


def train_st(task: RetrievalTask, split: TaskSplit, seed: int, settings: Settings) -> dict[str, float]:
    """Fine-tune with sentence-transformers' trainer and its usual loss for the shape; the held-out metrics."""
    budget = task.budget
    image = budget.image_size is not None
    model = None
    if image:
        options = model_options(task)
        model = st_reference.image_model(task.model.removeprefix('timm:'), options, settings.device)
    st_model, _ = st_reference.train(
        Path(task.model_path()),
        split.train,
        'triplet' if task.shape == 'labelled' else 'pairs',
        batch_size=budget.batch_size,
        max_length=budget.max_length or 256,
        epochs=budget.epochs,
        learning_rate=st_reference.DEFAULT_LEARNING_RATE,
        seed=seed,
        device=settings.device,
        output_dir=settings.workdir / f'st-quality-{task.name}-{seed}',
        bf16=settings.gpu,
        model=model,
    )
    held = split.held_out
    encode = st_reference.encode_records
    return score(encode(st_model, held.queries), encode(st_model, held.corpus), held)


# ---------------------------------------------------------------------------------------------
# A task's result and its rows
# ---------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    task: RetrievalTask
    split: SplitName
    train_size: int
    held: HeldOut
    before: dict[str, float]
    after: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # side -> one entry per seed
    seconds: dict[str, float] = field(default_factory=dict)

    def median(self, side: str, key: str) -> float:
        if side == 'pretrained':
            return self.before[key]
        return statistics.median(run[key] for run in self.after[side])

    @property
    def setting(self) -> str:
        t, b = self.task, self.task.budget
        size = f'max length {b.max_length}' if b.max_length else f'{b.image_size} px'
        return (
            f'{t.name}: {t.title}; {self.train_size} training {"pairs" if t.shape == "pairs" else "items"}, '
            f'{len(self.held.queries)} queries, {len(self.held.corpus)} in the corpus; {t.model.split("/")[-1]}, '
            f'{b.epochs} epoch{"s" if b.epochs > 1 else ""}, batch {b.batch_size}, {size}; '
            f'median of {len(t.seeds)} seeds, {self.split} split'
        )


def evaluate(
    task: RetrievalTask,
    settings: Settings,
    which: SplitName = 'report',
    overrides: dict[str, Any] | None = None,
    sides: tuple[str, ...] = SIDES,
    log: Any = None,
) -> TaskResult:
    """Every side of ``sides`` on ``task``'s ``which`` split, once per training seed."""
    split = task.split(which)
    result = TaskResult(task, which, len(split.train), split.held_out, pretrained(task, split.held_out, settings))
    for seed in task.seeds:
        for side in sides[1:] if sides[0] == 'pretrained' else sides:
            began = time.perf_counter()
            if side == 'ours':
                metrics = train_ours(task, split, seed, settings, overrides or {})
            else:
                metrics = train_st(task, split, seed, settings)
            result.after.setdefault(side, []).append(metrics)
            result.seconds[side] = result.seconds.get(side, 0.0) + time.perf_counter() - began
            if log is not None:
                log(f'{task.name} seed {seed} {side}: ' + ' '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
    return result


def rows(result: TaskResult) -> list[Row]:
    """A row per metric (ours against sentence-transformers, the pretrained value beside them), each
    meeting its target when ours >= sentence-transformers and ours >= pretrained."""
    out = []
    for key, label in METRICS:
        ours_value = result.median('ours', key)
        st_value = result.median('sentence-transformers', key)
        before = result.before[key]
        row = Row.compare(
            benchmark=BENCHMARK,
            measure=f'{label} after fine-tuning ({result.setting})',
            unit='',
            samples_ours=[run[key] for run in result.after['ours']],
            samples_reference=[run[key] for run in result.after['sentence-transformers']],
            reference_name='SentenceTransformerTrainer',
            target_ratio=None,
            target='>= reference and >= pretrained',
            extra={
                'pretrained': before,
                'train_seconds_ours': result.seconds.get('ours', 0.0),
                'train_seconds_reference': result.seconds.get('sentence-transformers', 0.0),
            },
        )
        row.met = ours_value >= st_value and ours_value >= before
        out.append(row)
    return out


def tiny_tasks(settings: Settings) -> list[RetrievalTask]:
    """The benchmark's task shapes on the test suite's tiny random models and generated data (harness
    check only): labelled texts split by class, text pairs, labelled images split by class."""
    from tests.support.tiny import TINY_TIMM, labelled_images, labelled_texts, make_tiny_bert, text_pairs

    folder = settings.workdir / 'tiny-bert'
    bert = folder if (folder / 'config.json').exists() else make_tiny_bert(folder)
    texts = labelled_texts(n_classes=6, per_class=8, seed=1)
    images = labelled_images(n_classes=4, per_class=6, seed=1)
    pairs = text_pairs(n=48, seed=1)

    def unseen(records: list[Record], held_labels: set[Any]) -> TaskSplit:
        return TaskSplit(
            [r for r in records if r.label not in held_labels], by_label([r for r in records if r.label in held_labels])
        )

    budget = Budget(epochs=1, batch_size=8, max_length=16)
    text_labels = sorted({r.label for r in texts}, key=str)
    image_labels = sorted({r.label for r in images}, key=str)
    return [
        RetrievalTask(
            'tiny-topics-unseen',
            'tiny texts',
            'labelled',
            str(bert),
            budget,
            True,
            lambda seed: unseen(texts, set(text_labels[:3])),
            seeds=(0,),
        ),
        RetrievalTask(
            'tiny-qa',
            'tiny pairs',
            'pairs',
            str(bert),
            budget,
            False,
            lambda seed: TaskSplit(pairs[:36], by_pair(pairs[36:])),
            seeds=(0,),
        ),
        RetrievalTask(
            'tiny-images-unseen',
            'tiny images',
            'labelled',
            TINY_TIMM,
            replace(budget, max_length=None, image_size=32),
            True,
            lambda seed: unseen(images, set(image_labels[:2])),
            seeds=(0,),
        ),
    ]


# The published table's tasks: a class split of texts, an item split of texts and a class split of images.
# qa (question -> answers, 1,300 training pairs) costs about seven times topics-unseen per side and seed:
# `python -m bench.quality --task qa` measures it alone.
REPORT_TASKS = ('topics-unseen', 'topics', 'digits-unseen')


def run(settings: Settings) -> list[Row]:
    """The table's rows. A full run measures its tasks in parallel, one process per task (each process
    alternates nothing: a task's sides share its process, so each side sees the same machine)."""
    if settings.mode == 'tiny':
        return [row for task in tiny_tasks(settings) for row in rows(evaluate(task, settings))]
    if settings.mode == 'quick':
        return rows(evaluate(replace(TASKS['topics-unseen'], seeds=(0,)), settings))
    return [row for result in evaluate_in_processes(REPORT_TASKS, settings) for row in rows(result)]


def evaluate_in_processes(names: tuple[str, ...], settings: Settings) -> list[TaskResult]:
    """Every task of ``names`` on its report split, each in its own ``python -m bench.quality`` process
    (started together); their results read back from the JSON each process writes."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    threads = ['--threads', str(settings.threads)] if settings.threads else []
    outputs = {name: settings.workdir / f'quality-{name}.json' for name in names}
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                '-m',
                'bench.quality',
                '--task',
                name,
                '--split',
                'report',
                '--json-out',
                str(out),
                *threads,
            ],
            cwd=root,
            env=dict(os.environ),
        )
        for name, out in outputs.items()
    }
    failed = [name for name, process in processes.items() if process.wait() != 0]
    if failed:
        raise RuntimeError(f'the quality run of {", ".join(failed)} failed (its output is above)')
    return [result_from_json(json.loads(outputs[name].read_text())) for name in names]


def result_to_json(result: TaskResult) -> dict[str, Any]:
    return {
        'task': result.task.name,
        'seeds': list(result.task.seeds),
        'split': result.split,
        'train_size': result.train_size,
        'before': result.before,
        'after': result.after,
        'seconds': result.seconds,
    }


def result_from_json(data: dict[str, Any]) -> TaskResult:
    task = replace(TASKS[data['task']], seeds=tuple(data['seeds']))
    held = task.split(data['split']).held_out
    return TaskResult(task, data['split'], data['train_size'], held, data['before'], data['after'], data['seconds'])


def main(argv: list[str] | None = None) -> int:
    """One task on one split, printed as JSON: what recipe tuning looks at (dev split only)."""
    import logging
    import tempfile

    parser = argparse.ArgumentParser(prog='python -m bench.quality', description=main.__doc__)
    parser.add_argument('--task', choices=list(TASKS), required=True)
    parser.add_argument('--split', choices=('dev', 'dev-2', 'report'), default='dev')
    parser.add_argument('--seeds', type=int, nargs='+', default=None)
    parser.add_argument('--sides', nargs='+', choices=SIDES, default=list(SIDES))
    parser.add_argument('--set', action='append', default=[], metavar='FIELD=JSON', help='a spec field of ours')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--json-out', type=Path, default=None, help="every seed's metrics, for the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (item.split('=', 1) for item in args.set)}
    task = TASKS[args.task] if args.seeds is None else replace(TASKS[args.task], seeds=tuple(args.seeds))
    with tempfile.TemporaryDirectory(prefix='finetuner-quality-') as tmp:
        settings = Settings(mode='full', workdir=Path(tmp))
        result = evaluate(
            task, settings, args.split, overrides, tuple(args.sides), log=lambda m: print(m, file=sys.stderr)
        )
    summary = {
        side: {key: result.median(side, key) for key, _ in METRICS}
        for side in args.sides
        if side == 'pretrained' or side in result.after
    }
    print(json.dumps({'task': task.name, 'split': args.split, 'overrides': overrides, 'medians': summary}))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(result_to_json(result)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
