"""Tier ``quality``: the time from a fresh process to a saved fine-tuned model on the GPU, and that
model's quality, this project against sentence-transformers' idiomatic script.

Both sides start all-MiniLM-L6-v2 (its real weights, carried as float16 and widened to float32) on the
demo's two tasks (``finetuner.demo.TASKS``: question -> same-topic questions, question -> answer), same
data, epochs, batch, learning rate and max length:

- this project: ``python -m finetuner_trainer --config FILE``, the command the local backend and a
  cluster's pod run: data, model load, evaluation before, training, evaluation per epoch, checkpoint,
  artifact; held-out data as ``evalData`` as the demo passes it;
- sentence-transformers: a fresh ``python`` that imports it, loads the model, trains with
  ``SentenceTransformerTrainer`` (``bf16=True``) and saves (``bench.st_reference``).

Each side's wall time is its process's, start to exit. Both saved folders are then read with
``sentence_transformers.SentenceTransformer`` and scored by the same code (nDCG@10 and MRR@10 from
``finetuner_trainer.evaluation.retrieval_metrics``) on the held-out questions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row
from bench.gpu_models import MINILM_ASSET, minilm_from_asset
from finetuner.api.layout import Record

ROOT = Path(__file__).resolve().parents[1]
K = 10
TIME_TARGET = 1.0


@dataclass
class HeldOut:
    queries: list[str]
    query_labels: list[str]
    index: list[str]
    index_labels: list[str]
    exclude_self: bool
    relevant: list[frozenset[int]] | None = None  # pairs: each query's relevant index positions


def held_out(records: list[Record]) -> HeldOut:
    """Labelled questions retrieve the other questions of their label; pairs retrieve their answers: each
    distinct question against the distinct answers (bench.tasks.by_pair), relevant those it is paired with."""
    if records and records[0].chunks:
        from bench.tasks import by_pair

        pairs = by_pair(records)
        queries = [q.text or '' for q in pairs.queries]
        answers = [d.text or '' for d in pairs.corpus]
        return HeldOut(queries, queries, answers, answers, False, list(pairs.relevant))
    texts = [r.text or '' for r in records]
    labels = [str(r.label) for r in records]
    return HeldOut(texts, labels, texts, labels, True)


def score(folder: Path, held: HeldOut, device: str) -> dict[str, float]:
    """nDCG@10 and MRR@10 of a sentence-transformers folder on the held-out queries."""
    import torch
    from sentence_transformers import SentenceTransformer

    from finetuner_trainer.evaluation import retrieval_metrics

    model = SentenceTransformer(str(folder), device=device)
    with torch.inference_mode():
        queries = model.encode(held.queries, batch_size=128, convert_to_tensor=True).float().cpu()
        index = model.encode(held.index, batch_size=128, convert_to_tensor=True).float().cpu()
    ids = {'query_ids': list(range(len(held.queries))), 'index_ids': list(range(len(held.index)))}
    metrics = retrieval_metrics(
        queries,
        index,
        held.query_labels,
        held.index_labels,
        limit=K,
        exclude_self=held.exclude_self,
        **(ids if held.exclude_self else {}),
        relevant=held.relevant,
    )
    return {'ndcg': metrics['ndcg_at_k'], 'mrr': metrics['mrr']}


def _timed_process(command: list[str], timeout: float, log: Path) -> float:
    """Wall seconds of a child process from start to exit; its output goes to ``log``."""
    began = time.perf_counter()
    with log.open('w') as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        tail = ' | '.join(log.read_text(errors='replace').strip().splitlines()[-6:])
        raise RuntimeError(f'{" ".join(command[:4])} exited with {done.returncode}: {tail[-600:]}')
    return seconds


def train_ours(
    ctx: Any, model_dir: Path, name: str, recipe: Any, train: list[Record], held: list[Record]
) -> tuple[float, Path]:
    from bench.data import write_records
    from finetuner.api.v1alpha1 import FinetuneRunSpec, TrainerConfig

    folder = ctx.workdir / 'quality' / f'ours-{name}'
    spec = FinetuneRunSpec(
        model=str(model_dir),
        train_data=str(write_records(train, folder / 'train.jsonl')),
        eval_data=str(write_records(held, folder / 'eval.jsonl')),
        loss=recipe.loss,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        model_options={'max_length': recipe.max_length},
        device=ctx.scale.device,
        seed=0,
        **recipe.fit_options,
    )
    config = TrainerConfig(
        run_name=f'gpu-quality-{name}',
        namespace='local',
        spec=spec,
        output_uri=(folder / 'output').as_uri(),
        termination_log=str(folder / 'termination-log'),
    )
    config_file = folder / 'config.json'
    config_file.write_text(config.model_dump_json(by_alias=True))
    command = [sys.executable, '-m', 'finetuner_trainer', '--config', str(config_file)]
    seconds = _timed_process(command, max(30.0, ctx.seconds_left() - 20), folder / 'trainer.log')
    return seconds, folder / 'output' / 'artifact'


def train_reference(ctx: Any, model_dir: Path, name: str, recipe: Any, train: list[Record]) -> tuple[float, Path]:
    from bench.data import write_records

    folder = ctx.workdir / 'quality' / f'st-{name}'
    arguments = {
        'model': str(model_dir),
        'records': str(write_records(train, folder / 'train.jsonl')),
        'task': 'pairs' if recipe.loss == 'MultipleNegativesRankingLoss' else 'triplet',
        'batch_size': recipe.batch_size,
        'max_length': recipe.max_length,
        'epochs': recipe.epochs,
        'learning_rate': recipe.learning_rate,
        'device': ctx.scale.device,
        'bf16': ctx.scale.cuda,
        'output': str(folder / 'model'),
    }
    (folder / 'arguments.json').write_text(json.dumps(arguments))
    command = [sys.executable, '-m', 'bench.gpu_quality', '--st-script', str(folder / 'arguments.json')]
    seconds = _timed_process(command, max(30.0, ctx.seconds_left() - 20), folder / 'st.log')
    return seconds, folder / 'model'


def st_script(arguments_file: Path) -> None:
    """sentence-transformers' side as a program: load, train, save (what its documentation shows)."""
    from bench import st_reference

    args = json.loads(arguments_file.read_text())
    records = [Record.model_validate_json(line) for line in Path(args['records']).read_text().splitlines() if line]
    model, _ = st_reference.train(
        Path(args['model']),
        records,
        args['task'],
        batch_size=args['batch_size'],
        max_length=args['max_length'],
        epochs=args['epochs'],
        learning_rate=args['learning_rate'],
        seed=0,
        device=args['device'],
        output_dir=Path(args['output']).with_name('trainer-output'),
        bf16=args['bf16'],
    )
    model.save(args['output'])  # type: ignore[attr-defined]


def task_rows(ctx: Any, model_dir: Path, name: str, recipe: Any, train: list[Record], held: list[Record]) -> list[Row]:
    evaluation = held_out(held)
    before = score(model_dir, evaluation, ctx.scale.device)
    ours_s, ours_folder = train_ours(ctx, model_dir, name, recipe, train, held)
    reference_s, reference_folder = train_reference(ctx, model_dir, name, recipe, train)
    after_ours = score(ours_folder, evaluation, ctx.scale.device)
    after_reference = score(reference_folder, evaluation, ctx.scale.device)
    setting = (
        f'{recipe.title}: {len(train)} training examples, {len(evaluation.queries)} held-out queries, '
        f'{recipe.epochs} epoch{"s" if recipe.epochs > 1 else ""}, batch {recipe.batch_size}, '
        f'lr {recipe.learning_rate:g}, max length {recipe.max_length}'
    )
    ratio = ours_s / reference_s
    met = ratio <= TIME_TARGET and after_ours['ndcg'] >= after_reference['ndcg']
    return [
        Row(
            benchmark='gpu_quality',
            measure=f'time to a fine-tuned model on the GPU, process start to saved model '
            f'(ratio = this project / reference, lower is better): {setting}',
            unit='s',
            ours=ours_s,
            reference=reference_s,
            reference_name='sentence-transformers script, bf16=True',
            ratio=ratio,
            target=f'<= {TIME_TARGET:g}x the time with >= its nDCG@10',
            met=met,
            samples_ours=[ours_s],
            samples_reference=[reference_s],
            note=''
            if met
            else (
                f'target missed: {ratio:.2f}x the time, nDCG@10 {after_ours["ndcg"]:.4f} vs '
                f'{after_reference["ndcg"]:.4f}; the trainer also evaluates before and after '
                'every epoch, checkpoints and writes an artifact; the script does none of these'
            ),
        ),
        Row.compare(
            benchmark='gpu_quality',
            measure=f'retrieval nDCG@10 after fine-tuning on the GPU: {setting}',
            unit='',
            samples_ours=[after_ours['ndcg']],
            samples_reference=[after_reference['ndcg']],
            reference_name='sentence-transformers fine-tuned',
            target_ratio=None,
            target='–',
            extra={
                'pretrained_ndcg': before['ndcg'],
                'pretrained_mrr': before['mrr'],
                'mrr_ours': after_ours['mrr'],
                'mrr_reference': after_reference['mrr'],
            },
        ),
    ]


def run(ctx: Any) -> None:
    from finetuner.demo import TASKS

    if ctx.scale.dry:
        from bench.gpu_text import minilm
        from tests.support.tiny import labelled_texts

        model_dir, _ = minilm(ctx)
        tiny = {'topics': (labelled_texts(4, 12, seed=1), labelled_texts(4, 4, seed=2))}
    elif ctx.assets is not None and (ctx.assets / MINILM_ASSET).is_dir():
        model_dir = minilm_from_asset(ctx.assets / MINILM_ASSET, ctx.workdir / 'all-MiniLM-L6-v2')
        tiny = {}
    else:
        ctx.add_row(
            Row.not_measured(
                benchmark='gpu_quality',
                measure='time to a fine-tuned model on the GPU',
                reason=f'no real weights: carry {MINILM_ASSET} (python -m bench.gpu_prepare)',
            )
        )
        return
    for name in ('topics',) if ctx.scale.dry else ('topics', 'qa'):
        recipe = TASKS[name]
        train, held = tiny[name] if ctx.scale.dry else recipe.load()
        if ctx.scale.rehearsal:  # the real data, thinned out: a CPU runs the same code in seconds
            train, held = train[:: max(1, len(train) // 96)], held[:: max(1, len(held) // 48)]
        if ctx.seconds_left() < 40:
            ctx.result.notes.append(f'{name} not run: {ctx.seconds_left():.0f} s left of the tier')
            ctx.save()
            continue
        ctx.measure(
            f'time to a fine-tuned model on the GPU: {recipe.title}',
            lambda name=name, recipe=recipe, train=train, held=held: task_rows(
                ctx, model_dir, name, recipe, train, held
            ),
            target=f'<= {TIME_TARGET:g}x',
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bench.gpu_quality')
    parser.add_argument(
        '--st-script', type=Path, required=True, help="run sentence-transformers' side (JSON arguments)"
    )
    args = parser.parse_args(argv)
    st_script(args.st_script)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
