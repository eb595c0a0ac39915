"""Hard-negative mining: what mined negatives do to fine-tuning, and how fast mining is.

- ``quality``: the ``quality`` benchmark's question -> answer task (``bench.tasks``' ``qa``: chatterbot-corpus,
  20% of the questions held out with all their answers, all-MiniLM-L6-v2, its budget), trained by
  ``bench.quality.train_ours`` with ``MultipleNegativesRankingLoss`` on the (question, answer) pairs as they
  are (in-batch negatives only), and the same with ``hardNegatives`` (the trainer mines, with the pretrained
  model and before training, :data:`HARD_NEGATIVES` for every pair, then trains on the (question, answer,
  negative) triplets). Both judged on the held-out questions by ``bench.quality.score`` (nDCG@10, MRR@10),
  median over the task's seeds; the pretrained model's numbers are in each row's ``pretrained``.
- ``throughput``: queries mined per second by ``finetuner_trainer.mining.mine_hard_negatives`` on the
  training pairs, all-MiniLM-L6-v2 on the CPU (embedding the corpus and the queries, exact search,
  choosing the negatives), median of rounds.
- ``synthesis``: the same task from unlabelled data. The training questions are cut in two halves by
  question (``bench.cross_encoder.teacher_student``, seeded): the teacher half's pairs train a cross-encoder
  (all-MiniLM-L6-v2's encoder plus a fresh 1-logit head, sentence-transformers' ``CrossEncoderTrainer``; none
  ships in a package that installs offline here), and a real ``task: synthesis`` run (the trainer's entry
  point, what ``finetuner.synthesize`` runs) relates each student-half question to :data:`NUM_RELATIONS` of
  the student-half answers with all-MiniLM-L6-v2 and scores every relation with that cross-encoder, the
  pairing of the student half unused. ``MarginMSELoss`` trains on the scored tuples through
  ``bench.quality.train_ours``; judged on the held-out questions against the pretrained model (target: no
  worse), median over the task's seeds. No held-out text reaches the cross-encoder or the synthesis run
  (``bench.cross_encoder.check_unseen`` raises otherwise).

Where an approximate index starts to pay is ``bench/mining_search.py``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import cross_encoder, ours, quality
from bench.common import Row, Settings
from bench.data import write_records
from bench.tasks import TASKS, RetrievalTask, TaskSplit
from bench.text_throughput import text_model
from finetuner.api.layout import Record

BENCHMARK = 'mining'
HARD_NEGATIVES: dict[str, Any] = {'num_negatives': 1, 'relative_margin': 0.05}
# The tiny random model scores everything alike: a margin would leave it almost no negatives.
TINY_HARD_NEGATIVES: dict[str, Any] = {'num_negatives': 1}
METRICS = (('ndcg_at_k', 'nDCG@10'), ('mrr', 'MRR@10'))


def qa_task(settings: Settings) -> RetrievalTask:
    """The question -> answer task of ``bench.tasks`` (the tiny one of ``bench.quality`` in tiny mode)."""
    if settings.mode == 'tiny':
        return next(task for task in quality.tiny_tasks(settings) if task.shape == 'pairs')
    return replace(TASKS['qa'], seeds=(0,)) if settings.mode == 'quick' else TASKS['qa']


def _hard_negatives(settings: Settings) -> dict[str, Any]:
    return TINY_HARD_NEGATIVES if settings.mode == 'tiny' else HARD_NEGATIVES


def quality_rows(settings: Settings) -> list[Row]:
    """MNRL with mined hard negatives against MNRL without, median over seeds."""
    from finetuner.api.mining import HardNegativeOptions

    task = qa_task(settings)
    split = task.split('report')
    before = quality.pretrained(task, split.held_out, settings)
    plain = {'loss': 'MultipleNegativesRankingLoss'}
    mined = {**plain, 'hard_negatives': HardNegativeOptions(**_hard_negatives(settings))}
    with_negatives: list[dict[str, float]] = []
    without: list[dict[str, float]] = []
    for seed in task.seeds:  # the sides alternate, seed by seed
        with_negatives.append(quality.train_ours(task, split, seed, settings, mined))
        without.append(quality.train_ours(task, split, seed, settings, plain))
    setting = quality.TaskResult(task, 'report', len(split.train), split.held_out, before).setting
    options = ', '.join(f'{k} {v}' for k, v in _hard_negatives(settings).items())
    return [
        Row.compare(
            benchmark=BENCHMARK,
            measure=f'retrieval {label} of MultipleNegativesRankingLoss with mined hard negatives ({options}) '
            f'({setting})',
            unit='',
            samples_ours=[after[key] for after in with_negatives],
            samples_reference=[after[key] for after in without],
            reference_name='the same without hard negatives',
            target_ratio=None,
            target='–',
            extra={'pretrained': before[key]},
        )
        for key, label in METRICS
    ]


def _training_pairs(split: TaskSplit) -> tuple[list[Any], list[Any]]:
    from finetuner_trainer.data import Item

    queries = [Item(text=r.chunks[0].text) for r in split.train]
    positives = [Item(text=r.chunks[1].text) for r in split.train]
    return queries, positives


def throughput_row(settings: Settings) -> Row:
    """Queries mined per second, end to end (embedding, exact search, choice), pretrained MiniLM."""
    from finetuner.api.mining import HardNegativeOptions
    from finetuner.mining import load_model
    from finetuner_trainer.mining import mine_hard_negatives

    model = load_model(str(text_model(settings)), settings.device)
    queries, positives = _training_pairs(qa_task(settings).split('report'))
    options = HardNegativeOptions(num_negatives=3, search='exact')
    rates: list[float] = []
    unique = 0
    for _ in range(settings.pick(full=3, quick=2, tiny=1)):
        began = time.perf_counter()
        _, stats = mine_hard_negatives(model, queries, positives, options)
        rates.append(stats.queries / (time.perf_counter() - began))
        unique = stats.queries
    return Row(
        benchmark=BENCHMARK,
        measure=f'hard-negative mining throughput, all-MiniLM-L6-v2 on {settings.device.upper()}, {unique} unique '
        f'questions against their {len(set(p.text for p in positives))} answers, 3 negatives each, exact search '
        '(embedding included)',
        unit='queries/s',
        ours=statistics.median(rates),
        samples_ours=rates,
        target='–',
    )


SYNTHESIS_LOSS = 'MarginMSELoss'
NUM_RELATIONS = 5


@dataclass
class SynthesisSeed:
    """One seed of the synthesis rows: the held-out metrics of the student, and what it took."""

    after: dict[str, float]
    teacher_questions: int
    student_questions: int
    student_answers: int
    dropped_pairs: int
    ce_training_pairs: int
    ce_true_above_random: float
    ce_seconds: float
    scored_tuples: int
    synthesis_seconds: float
    train_seconds: float


def synthesize_tuples(
    task: RetrievalTask, questions: list[str], answers: list[str], cross_encoder: Path, settings: Settings, name: str
) -> list[Record]:
    """A real ``task: synthesis`` run through the trainer's entry point (``finetuner_trainer.train``, what the
    trainer program runs for ``finetuner.synthesize``): ``questions`` related to :data:`NUM_RELATIONS` of
    ``answers`` each by the task's model, every relation scored by ``cross_encoder``; the scored tuples."""
    from finetuner.api.mining import SYNTHESIS_DATA_FILE, SynthesisOptions

    recipe = _recipe(settings)
    corpus = write_records([Record(text=a) for a in answers], settings.workdir / 'data' / f'{name}-corpus.jsonl')
    options = SynthesisOptions(
        corpus_data=corpus.as_uri(),
        cross_encoder=str(cross_encoder),
        num_relations=NUM_RELATIONS,
        max_length=recipe.max_length,
    )
    spec = ours.spec_for(
        task.model,
        [Record(text=q) for q in questions],
        settings.workdir,
        name,
        task='synthesis',
        synthesis=options,
        model_options=quality.model_options(task),
        device=settings.device,
    )
    result = ours.train_run(spec, settings.workdir, name)
    data = Path(result.artifact_uri.removeprefix('file://')) / SYNTHESIS_DATA_FILE
    return [Record.model_validate_json(line) for line in data.read_text().splitlines() if line.strip()]


def _recipe(settings: Settings) -> cross_encoder.Recipe:
    return cross_encoder.TINY_RECIPE if settings.mode == 'tiny' else cross_encoder.RECIPE


def synthesis_seed(task: RetrievalTask, split: TaskSplit, seed: int, settings: Settings) -> SynthesisSeed:
    """Train the cross-encoder on the seed's teacher half, synthesise scored tuples from the student half
    (questions and answers, unpaired), fine-tune with MarginMSELoss on them, judge on the held-out set."""
    held = split.held_out
    halves = cross_encoder.teacher_student(split.train, held, seed)
    name = f'synthesis-{task.name}-{seed}-{time.monotonic_ns()}'
    trained = cross_encoder.train_cross_encoder(
        text_model(settings),
        halves.teacher,
        held,
        settings.workdir / 'cross-encoders' / name,
        seed,
        _recipe(settings),
        settings.device,
    )
    questions, answers = halves.student_questions, halves.student_answers
    cross_encoder.check_unseen([*questions, *answers], held, "the synthesis run's questions and corpus")
    began = time.perf_counter()
    tuples = synthesize_tuples(task, questions, answers, trained.path, settings, name)
    synthesis_seconds = time.perf_counter() - began
    cross_encoder.check_unseen((c.text for r in tuples for c in r.chunks), held, 'the synthesised tuples')
    began = time.perf_counter()
    after = quality.train_ours(task, TaskSplit(tuples, held), seed, settings, {'loss': SYNTHESIS_LOSS})
    return SynthesisSeed(
        after=after,
        teacher_questions=len({r.chunks[0].text for r in halves.teacher}),
        student_questions=len(questions),
        student_answers=len(answers),
        dropped_pairs=halves.dropped,
        ce_training_pairs=trained.training_pairs,
        ce_true_above_random=cross_encoder.cross_encoder_true_above_random(trained.path, held, seed, settings.device),
        ce_seconds=trained.seconds,
        scored_tuples=len(tuples),
        synthesis_seconds=synthesis_seconds,
        train_seconds=time.perf_counter() - began,
    )


def synthesis_rows(settings: Settings) -> list[Row]:
    """Synthesis -> MarginMSELoss against the pretrained model, per metric, median over the task's seeds."""
    task = qa_task(settings)
    split = task.split('report')
    held = split.held_out
    student = quality.pretrained_embedder(task, settings)
    before = quality.pretrained(task, held, settings, student)
    student_above = cross_encoder.embedder_true_above_random(student, held, task.seeds[0])
    seeds = [synthesis_seed(task, split, seed, settings) for seed in task.seeds]
    recipe = _recipe(settings)
    budget = task.budget
    ce_epochs = f'{recipe.epochs} epoch{"s" if recipe.epochs > 1 else ""}'

    def median(field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in seeds))

    def each(field: str) -> str:
        return ' '.join(f'{getattr(s, field):.4g}' for s in seeds)

    def span(field: str) -> str:  # a count over the seeds' halves: one number, or the lowest-highest
        values = sorted(getattr(s, field) for s in seeds)
        return str(values[0]) if values[0] == values[-1] else f'{values[0]}-{values[-1]}'

    setting = (
        f'{task.name}: {task.title}; cross-encoder {Path(task.model).name} + a 1-logit head trained by '
        f'CrossEncoderTrainer (BinaryCrossEntropyLoss, {ce_epochs}, batch {recipe.batch_size}, lr '
        f'{recipe.learning_rate:g}, max length {recipe.max_length}) on the teacher half of the training questions '
        f'({span("teacher_questions")}); {NUM_RELATIONS} relations mined by {Path(task.model).name} for each of the '
        f'{span("student_questions")} student-half questions among their {span("student_answers")} answers, '
        f'unlabelled; {budget.epochs} '
        f'epoch{"s" if budget.epochs > 1 else ""}, batch {budget.batch_size}, max length {budget.max_length}; '
        f'{len(held.queries)} held-out queries, {len(held.corpus)} in the corpus; median of {len(seeds)} '
        f'seed{"s" if len(seeds) > 1 else ""}, report split'
    )
    extra: dict[str, float | str] = {
        'ce_true_above_random': median('ce_true_above_random'),
        'ce_true_above_random_per_seed': each('ce_true_above_random'),
        'pretrained_true_above_random': student_above,
        'ce_training_pairs': median('ce_training_pairs'),
        'ce_train_seconds': median('ce_seconds'),
        'scored_tuples': median('scored_tuples'),
        'synthesis_seconds': median('synthesis_seconds'),
        'margin_mse_train_seconds': median('train_seconds'),
        'dropped_training_pairs': median('dropped_pairs'),
    }
    return [
        Row.compare(
            benchmark=BENCHMARK,
            measure=f'retrieval {label} after synthesis -> {SYNTHESIS_LOSS} ({setting})',
            unit='',
            samples_ours=[s.after[key] for s in seeds],
            samples_reference=[before[key]] * len(seeds),
            reference_name='the pretrained model',
            target_ratio=1.0,
            target='>= pretrained',
            extra=extra,
        )
        for key, label in METRICS
    ]


def closing_notes(rows: list[Row]) -> list[str]:
    """What the synthesis rows' teacher is, and why they miss when they do."""
    synthesis = [r for r in rows if 'after synthesis' in r.measure and r.ours is not None]
    if not synthesis:
        return []
    extra = synthesis[0].extra
    teacher = float(extra.get('ce_true_above_random', float('nan')))
    student = float(extra.get('pretrained_true_above_random', float('nan')))
    per_seed = extra.get('ce_true_above_random_per_seed', '')
    note = (
        'Synthesis rows: no trained cross-encoder installs offline here, so the benchmark trains its teacher itself '
        "(bench/cross_encoder.py): all-MiniLM-L6-v2's encoder with a fresh 1-logit head, labelled by the teacher "
        'half of the training questions; the student half goes to the synthesis run unlabelled, and no held-out '
        f'text reaches either. On the held-out questions that cross-encoder ranks the true answer above a random '
        f'other one {teacher:.2f} of the time (median over seeds; per seed {per_seed}), the pretrained bi-encoder '
        f'by cosine {student:.2f}.'
    )
    if all(r.met for r in synthesis):
        return [note]
    worst = min(r.ratio for r in synthesis if r.ratio is not None)
    if teacher <= student:
        why = (
            ' That teacher ranks worse than the student it teaches, and MarginMSELoss pulls the bi-encoder towards '
            "the cross-encoder's score margins among each question's 5 nearest answers, its errors included: the "
            f'student ends near where it began, and the rows miss ">= pretrained" by up to {1 - worst:.1%}.'
        )
    else:
        why = (
            ' The teacher orders a true and a random answer better than the student, yet the student gains nothing '
            'on ranking the whole corpus: the margins it learns are among the 5 answers it already ranks closest, '
            f'where the teacher is weakest (the rows miss by up to {1 - worst:.1%}).'
        )
    return [
        note
        + why
        + ' A cross-encoder trained on far more labelled pairs (such as cross-encoder/ms-marco-MiniLM-L6-v2, '
        'where a network is available) is the teacher synthesis is meant for.'
    ]


def run(settings: Settings) -> list[Row]:
    return [*quality_rows(settings), throughput_row(settings), *synthesis_rows(settings)]
