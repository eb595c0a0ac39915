"""Tiny models with random weights and generated data: what every test trains on.

Nothing here downloads anything. Models are Hugging Face folders built from small configs
(with a word-level tokenizer trained on the fly) or timm's ``test_*`` architectures.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

from finetuner.api.layout import Record

TINY_TIMM = 'timm:test_resnet'  # 370k parameters, 96-dim features, no download with pretrained=False
TINY_TIMM_OPTIONS = {'pretrained': False, 'image_size': 32}

WORDS = (
    'red green blue yellow black white cat dog bird fish car bus train plane apple pear grape lemon '
    'run walk swim fly sing read write draw small big fast slow happy sad warm cold old new'
).split()


def _word_tokenizer(directory: Path, model_max_length: int = 64):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token='[UNK]',
        pad_token='[PAD]',
        cls_token='[CLS]',
        sep_token='[SEP]',
        mask_token='[MASK]',
        model_max_length=model_max_length,
    )
    from tokenizers import processors

    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B [SEP]', special_tokens=[('[CLS]', 2), ('[SEP]', 3)]
    )
    fast.save_pretrained(directory)
    return fast, len(vocab)


def make_tiny_bert(directory: Path, hidden_size: int = 32) -> Path:
    """A 2-layer BERT (random weights) with its tokenizer, saved as a Hugging Face folder."""
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, vocab_size = _word_tokenizer(directory)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory


def make_tiny_clip(directory: Path, dim: int = 32, image_size: int = 32) -> Path:
    """A tiny CLIPModel (random weights), tokenizer and image processor in one folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, vocab_size = _word_tokenizer(directory)
    config = CLIPConfig(
        text_config={
            'vocab_size': vocab_size,
            'hidden_size': dim,
            'intermediate_size': dim * 2,
            'num_hidden_layers': 2,
            'num_attention_heads': 2,
            'max_position_embeddings': 64,
            'pad_token_id': 0,
            'bos_token_id': 2,
            'eos_token_id': 3,
        },
        vision_config={
            'hidden_size': dim,
            'intermediate_size': dim * 2,
            'num_hidden_layers': 2,
            'num_attention_heads': 2,
            'image_size': image_size,
            'patch_size': 8,
        },
        projection_dim=dim,
    )
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(
        size={'shortest_edge': image_size}, crop_size={'height': image_size, 'width': image_size}
    ).save_pretrained(directory)
    return directory


def png_bytes(color: tuple[int, int, int], size: int = 32, noise: int = 20, seed: int = 0) -> bytes:
    """A small PNG of one colour with some noise (classes are told apart by colour)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.array(color, dtype=np.int16).reshape(1, 1, 3)
    pixels = np.clip(base + rng.integers(-noise, noise + 1, size=(size, size, 3)), 0, 255).astype('uint8')
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format='PNG')
    return out.getvalue()


PALETTE = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (20, 20, 20), (240, 240, 240)]


def labelled_images(n_classes: int = 3, per_class: int = 8, size: int = 32, seed: int = 0) -> list[Record]:
    records = []
    for label in range(n_classes):
        for i in range(per_class):
            blob = base64.b64encode(png_bytes(PALETTE[label % len(PALETTE)], size, seed=seed * 1000 + label * 100 + i))
            records.append(Record(blob=blob.decode(), label=f'class-{label}'))
    return records


def labelled_texts(n_classes: int = 4, per_class: int = 8, seed: int = 0) -> list[Record]:
    """Sentences of a class share its topic words; other words are noise."""
    rng = random.Random(seed)
    topics = [WORDS[i * 4 : i * 4 + 4] for i in range(n_classes)]
    records = []
    for label, topic in enumerate(topics):
        for _ in range(per_class):
            words = rng.sample(topic, 2) + rng.sample(WORDS[24:], 2)
            rng.shuffle(words)
            records.append(Record(text=' '.join(words), label=label))
    return records


def text_pairs(n: int = 16, seed: int = 0, with_score: bool = False) -> list[Record]:
    """Query-document pairs (parent with two chunks), optionally with a similarity score."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        topic = WORDS[(i * 3) % 24 : (i * 3) % 24 + 3]
        query = ' '.join(rng.sample(topic, 2))
        document = ' '.join(topic + rng.sample(WORDS[24:], 2))
        score = {'score': round(rng.random(), 3)} if with_score else {}
        records.append(Record(chunks=[Record(text=query), Record(text=document)], **score))
    return records


def text_image_pairs(n: int = 12, size: int = 32, seed: int = 0) -> list[Record]:
    """CLIP data: a parent with a text chunk and an image chunk, modalities named."""
    names = ['red', 'green', 'blue', 'yellow', 'black', 'white']
    records = []
    for i in range(n):
        k = i % len(names)
        blob = base64.b64encode(png_bytes(PALETTE[k], size, seed=seed * 1000 + i)).decode()
        records.append(
            Record(
                chunks=[
                    Record(text=f'a {names[k]} picture', modality='text'),
                    Record(blob=blob, modality='image'),
                ]
            )
        )
    return records


def write_jsonl(records: list[Record], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w') as f:
        for record in records:
            f.write(json.dumps(record.model_dump(exclude_none=True, exclude_defaults=True)) + '\n')
    return path
