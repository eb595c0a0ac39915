"""Real datasets that ship offline inside PyPI packages, as Records (no torch, no network).

- :func:`chatterbot_pairs`: question-answer pairs of ``chatterbot-corpus`` (text retrieval), split
  deterministically by *question* so that held-out questions were never seen in training.
- :func:`chatterbot_categories`: the corpus's questions labelled with their category (the YAML file
  they come from: ai, coding, food, ...), split per category; category-level retrieval, where a
  held-out question should find questions of its own topic.
- :func:`textile_images`: the ``conformal-clip-data`` textile images (3 classes) as labelled
  image Records (by path), split deterministically per class.
"""

from __future__ import annotations

import random
from pathlib import Path

from finetuner.api.layout import Record


def _conversations() -> list[tuple[str, str, str]]:
    """(category, question, answer) of every two-turn opening in the English corpus, in file order."""
    import yaml

    try:
        import chatterbot_corpus
    except ImportError as e:
        raise ImportError('chatterbot_pairs needs the chatterbot-corpus package (pip install chatterbot-corpus)') from e
    folder = Path(chatterbot_corpus.__file__).parent / 'data' / 'english'
    rows: list[tuple[str, str, str]] = []
    for path in sorted(folder.glob('*.yml')):
        document = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
        for conversation in document.get('conversations') or []:
            if len(conversation) >= 2 and isinstance(conversation[0], str) and isinstance(conversation[1], str):
                question, answer = conversation[0].strip(), conversation[1].strip()
                if question and answer:
                    rows.append((path.stem, question, answer))
    return rows


def chatterbot_pairs(held_out: float = 0.2, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, held-out) query-document pairs; every answer of a question lands on the same side."""
    answers: dict[str, list[str]] = {}
    for _, question, answer in _conversations():
        answers.setdefault(question, []).append(answer)
    questions = sorted(answers)
    random.Random(seed).shuffle(questions)
    cut = round(len(questions) * held_out)

    def pairs(chosen: list[str]) -> list[Record]:
        return [Record(chunks=[Record(text=q), Record(text=a)]) for q in chosen for a in answers[q]]

    return pairs(questions[cut:]), pairs(questions[:cut])


def chatterbot_categories(
    held_out: float = 0.3, seed: int = 0, min_per_class: int = 10, max_per_class: int | None = 30
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) questions labelled with their category, split per category.

    A question is counted once (in the first category file that holds it), so no held-out question
    is also a training item. Categories with fewer than ``min_per_class`` questions are left out;
    ``max_per_class`` caps the large ones (trivia has 261 questions) so that no category dominates.
    Every kept category has at least two held-out questions (each can retrieve another).
    """
    by_category: dict[str, list[str]] = {}
    seen: set[str] = set()
    for category, question, _ in _conversations():
        if question not in seen:
            seen.add(question)
            by_category.setdefault(category, []).append(question)
    rng = random.Random(seed)
    train: list[Record] = []
    held: list[Record] = []
    for category in sorted(by_category):
        questions = sorted(by_category[category])
        if len(questions) < min_per_class:
            continue
        rng.shuffle(questions)
        questions = questions[:max_per_class] if max_per_class is not None else questions
        cut = max(2, round(len(questions) * held_out))
        held += [Record(text=q, label=category) for q in questions[:cut]]
        train += [Record(text=q, label=category) for q in questions[cut:]]
    return train, held


def textile_images(
    held_out: float = 0.2, seed: int = 0, per_class: int | None = None
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) labelled image Records (uri = absolute path), the label being the folder."""
    try:
        import conformal_clip_data
    except ImportError as e:
        raise ImportError('textile_images needs the conformal-clip-data package') from e
    root = conformal_clip_data.textile_simulated_root()
    train: list[Record] = []
    held: list[Record] = []
    rng = random.Random(seed)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob('*.jpg')) + sorted(folder.glob('*.png'))
        rng.shuffle(files)
        if per_class is not None:
            files = files[:per_class]
        cut = round(len(files) * held_out)
        held += [Record(uri=str(f), label=folder.name) for f in files[:cut]]
        train += [Record(uri=str(f), label=folder.name) for f in files[cut:]]
    return train, held
