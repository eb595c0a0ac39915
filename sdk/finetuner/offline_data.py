"""Real datasets that ship offline inside PyPI packages, as Records (no torch, no network).

- :func:`chatterbot_pairs`: question-answer pairs of ``chatterbot-corpus`` (text retrieval), split
  deterministically by *question* so that held-out questions were never seen in training.
- :func:`textile_images`: the ``conformal-clip-data`` textile images (3 classes) as labelled
  image Records (by path), split deterministically per class.
"""

from __future__ import annotations

import random
from pathlib import Path

from finetuner.api.layout import Record


def chatterbot_pairs(held_out: float = 0.2, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, held-out) query-document pairs; every answer of a question lands on the same side."""
    import yaml

    try:
        import chatterbot_corpus
    except ImportError as e:
        raise ImportError('chatterbot_pairs needs the chatterbot-corpus package (pip install chatterbot-corpus)') from e
    folder = Path(chatterbot_corpus.__file__).parent / 'data' / 'english'
    answers: dict[str, list[str]] = {}
    for path in sorted(folder.glob('*.yml')):
        document = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
        for conversation in document.get('conversations') or []:
            if len(conversation) >= 2 and isinstance(conversation[0], str) and isinstance(conversation[1], str):
                question, answer = conversation[0].strip(), conversation[1].strip()
                if question and answer:
                    answers.setdefault(question, []).append(answer)
    questions = sorted(answers)
    random.Random(seed).shuffle(questions)
    cut = round(len(questions) * held_out)

    def pairs(chosen: list[str]) -> list[Record]:
        return [Record(chunks=[Record(text=q), Record(text=a)]) for q in chosen for a in answers[q]]

    return pairs(questions[cut:]), pairs(questions[:cut])


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
