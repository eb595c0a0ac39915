"""Tiny cross-encoders and question-answer texts for the mining and synthesis tests (nothing downloads).

The cross-encoder is a 2-layer ``BertForSequenceClassification`` with random weights and the word-level
tokenizer of :mod:`tests.support.tiny`, initialised with a wide spread (``initializer_range`` 0.5) so that
its scores differ from pair to pair (with BERT's usual 0.02 every pair scores about the same).
"""

from __future__ import annotations

import random
from pathlib import Path

from finetuner.api.layout import Record
from tests.support.tiny import WORDS, _word_tokenizer


def make_tiny_cross_encoder(directory: Path, num_labels: int = 1, seed: int = 0, hidden_size: int = 32) -> Path:
    """A random sequence-classification BERT (a cross-encoder) with its tokenizer, as a Hugging Face folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, vocab_size = _word_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=64,
        num_labels=num_labels,
        initializer_range=0.5,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def topic_texts(n: int = 24, seed: int = 0) -> tuple[list[str], list[str]]:
    """(questions, answers): answer i shares the topic words of question i (several pairs per topic)."""
    rng = random.Random(seed)
    questions, answers = [], []
    for i in range(n):
        topic = WORDS[(i * 3) % 24 : (i * 3) % 24 + 3]
        questions.append(' '.join(rng.sample(topic, 2) + rng.sample(WORDS[24:], 1)))
        answers.append(' '.join(topic + rng.sample(WORDS[24:], 2)))
    return questions, answers


def pair_records(questions: list[str], answers: list[str]) -> list[Record]:
    return [Record(chunks=[Record(text=q), Record(text=a)]) for q, a in zip(questions, answers, strict=True)]


def text_records(texts: list[str]) -> list[Record]:
    return [Record(text=t) for t in texts]
