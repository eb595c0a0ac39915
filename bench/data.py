"""Benchmark data: real offline data (chatterbot-corpus, generated 224 px images) or the test suite's
tiny generated data in ``tiny`` mode. Everything is returned as :class:`finetuner.api.layout.Record`
lists so that both sides of a benchmark read exactly the same items."""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from pathlib import Path

from finetuner.api.layout import Record


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    category: str


def chatterbot_pairs() -> list[QAPair]:
    """Every (question, first answer) of chatterbot-corpus' English conversations, with its file as the
    category. Conversations are lists whose first entry is the question; we pair it with the answer
    that follows."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / 'data' / 'english'
    pairs: list[QAPair] = []
    for path in sorted(root.glob('*.yml')):
        content = yaml.safe_load(path.read_text(encoding='utf-8'))
        category = path.stem
        for conversation in content.get('conversations', []) or []:
            if not isinstance(conversation, list) or len(conversation) < 2:
                continue
            question, answer = conversation[0], conversation[1]
            if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
                pairs.append(QAPair(question.strip(), answer.strip(), category))
    if not pairs:
        raise RuntimeError(f'chatterbot-corpus at {root} holds no question-answer pairs')
    return pairs


def labelled_sentences(pairs: list[QAPair]) -> list[Record]:
    """Questions and answers labelled with their category (21 classes): data for a triplet loss."""
    unique = {(text, p.category) for p in pairs for text in (p.question, p.answer)}
    return [Record(text=text, label=category) for text, category in sorted(unique)]


def pair_records(pairs: list[QAPair]) -> list[Record]:
    """Query-document pairs (question, answer): data for an in-batch-negatives loss."""
    return [Record(chunks=[Record(text=p.question), Record(text=p.answer)]) for p in pairs]


def split_by_question(pairs: list[QAPair], held_out: float, seed: int) -> tuple[list[QAPair], list[QAPair]]:
    """Hold out whole questions (every answer of a held-out question goes to the test side), so no
    test query was seen in training."""
    questions = sorted({p.question for p in pairs})
    random.Random(seed).shuffle(questions)
    test_questions = set(questions[: max(1, int(len(questions) * held_out))])
    train = [p for p in pairs if p.question not in test_questions]
    test = [p for p in pairs if p.question in test_questions]
    return train, test


def repeat_to(records: list[Record], count: int, seed: int) -> list[Record]:
    """``count`` records drawn by cycling a shuffled copy (a benchmark needs a fixed number of steps)."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[i % len(shuffled)] for i in range(count)]


def labelled_images(count: int, size: int, n_classes: int = 8, seed: int = 0) -> list[Record]:
    """``count`` JPEG images of ``size`` px, ``n_classes`` colour classes with noise: enough for
    throughput (the pixels do not change the speed, decoding the real size does)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(n_classes, 3))
    records = []
    for i in range(count):
        label = i % n_classes
        noise = rng.integers(-40, 41, size=(size, size, 3))
        pixels = np.clip(palette[label].reshape(1, 1, 3) + noise, 0, 255).astype('uint8')
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format='JPEG', quality=90)
        records.append(Record(blob=base64.b64encode(out.getvalue()).decode(), label=f'class-{label}'))
    return records


def decode_blob(record: Record) -> bytes:
    if record.blob is None:
        raise ValueError('an image record without a blob')
    return base64.b64decode(record.blob)


def write_records(records: list[Record], path: Path) -> Path:
    """Write records as JSONL (the trainer's dataset format); the path."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w') as f:
        for record in records:
            f.write(json.dumps(record.model_dump(exclude_none=True, exclude_defaults=True)) + '\n')
    return path


def repeat_to_pairs(pairs: list[QAPair], count: int, seed: int) -> list[QAPair]:
    """At most ``count`` pairs, drawn at random without repetition (a smaller training set)."""
    chosen = list(pairs)
    random.Random(seed).shuffle(chosen)
    return chosen[:count]
