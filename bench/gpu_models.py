"""Models, data and arithmetic of the GPU benchmarks (``python -m bench --gpu``).

The device machine has no network and the tree sent to it is capped (64 MiB), so real weights of
all-MiniLM-L6-v2 travel as float16 safetensors (45 MB) in the carried folder and are widened back to
float32 there (:func:`minilm_from_asset`); BERT-base and the MiniLM architecture for throughput and
MFU are random weights built from their configs (:func:`random_text_model`): weights do not change
the speed.

Model FLOPs of one training step of a BERT-like encoder (the numerator of MFU), per sequence of
``s`` tokens: ``6 * N * s + 12 * L * s**2 * d`` where ``N`` is the number of non-embedding
parameters (every matrix multiply of the encoder layers; forward 2 FLOPs per parameter and token,
backward twice that), ``L`` the number of layers and ``d`` the hidden size (the attention scores
``QK^T`` and their product with ``V``: 4 * s * d per token and layer forward, times 3 with the
backward). Embedding lookups, layer norms, softmax, dropout and the loss are not counted, as in the
usual definition (Kaplan et al. 2020; PaLM's appendix B). Padding tokens are never counted: the MFU
runs use texts of exactly ``s`` tokens.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; first match of the
# device name wins (so the PCIe and NVL parts of the H100 are told apart from the SXM part).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H100', 989.4e12),
    ('H200', 989.4e12),
    ('H800', 989.4e12),
    ('A100', 312e12),
    ('L40S', 362e12),
    ('L4', 121e12),
)

MINILM_ASSET = 'all-MiniLM-L6-v2-fp16'
FP16_WEIGHTS = 'model.fp16.safetensors'
# all-MiniLM-L6-v2's config.json (sentence-transformers/all-MiniLM-L6-v2): 6 layers, hidden 384.
MINILM_CONFIG: dict[str, Any] = {
    'hidden_size': 384,
    'num_hidden_layers': 6,
    'num_attention_heads': 12,
    'intermediate_size': 1536,
    'max_position_embeddings': 512,
}
# bert-base-uncased: 12 layers, hidden 768 (transformers' BertConfig defaults, written out).
BERT_BASE_CONFIG: dict[str, Any] = {
    'hidden_size': 768,
    'num_hidden_layers': 12,
    'num_attention_heads': 12,
    'intermediate_size': 3072,
    'max_position_embeddings': 512,
}
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt')
MINILM_SMALL_FILES = (
    'config.json',
    'config_sentence_transformers.json',
    'modules.json',
    'sentence_bert_config.json',
    *TOKENIZER_FILES,
    '1_Pooling/config.json',
)


def peak_bf16(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU by its name (FLOP/s); None when not in the table."""
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def nonembedding_parameters(backbone: Any) -> int:
    """Parameters of a transformers encoder outside its embeddings (and pooler): the N of 6N."""
    return sum(
        p.numel()
        for name, p in backbone.named_parameters()
        if not name.startswith('embeddings.') and not name.startswith('pooler.')
    )


def train_flops_per_sequence(parameters: int, layers: int, hidden: int, tokens: int) -> float:
    """Model FLOPs of forward + backward of one sequence of ``tokens`` tokens (module docstring)."""
    return 6.0 * parameters * tokens + 12.0 * layers * hidden * tokens**2


def write_minilm_asset(source: Path, target: Path) -> Path:
    """all-MiniLM-L6-v2 (a sentence-transformers folder) with its weights as float16: what is carried
    to the device machine. Returns the asset folder."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for name in MINILM_SMALL_FILES:
        if (source / name).exists():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
    weights = load_file(source / 'model.safetensors')
    save_file({k: v.half().contiguous() for k, v in weights.items()}, target / FP16_WEIGHTS)
    return target


def minilm_from_asset(asset: Path, target: Path) -> Path:
    """The carried float16 MiniLM as a float32 sentence-transformers folder (what both sides load)."""
    from safetensors.torch import load_file, save_file

    if (target / 'model.safetensors').exists():
        return target
    if not (asset / FP16_WEIGHTS).exists():
        raise FileNotFoundError(
            f'{asset / FP16_WEIGHTS} is missing: carry the folder made by `python -m bench.gpu_prepare`'
        )
    target.mkdir(parents=True, exist_ok=True)
    for name in MINILM_SMALL_FILES:
        if (asset / name).exists():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(asset / name, target / name)
    weights = load_file(asset / FP16_WEIGHTS)
    save_file({k: v.float().contiguous() for k, v in weights.items()}, target / 'model.safetensors')
    return target


def random_text_model(target: Path, config: dict[str, Any], tokenizer_source: Path) -> Path:
    """A BERT encoder with random weights from ``config`` and the tokenizer of ``tokenizer_source``,
    saved as a Hugging Face folder in float32."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (target / 'config.json').exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    tokenizer.save_pretrained(str(target))
    bert = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0, **config)
    BertModel(bert, add_pooling_layer=False).save_pretrained(str(target))
    return target


def word_vocabulary(tokenizer: Any) -> list[str]:
    """Whole words of a tokenizer's vocabulary (each one token): what fixed-length texts are made of."""
    special = set(tokenizer.all_special_tokens)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and w not in special]
    single = [w for w in sorted(words) if len(tokenizer.tokenize(w)) == 1]
    if len(single) < 10:
        raise ValueError(f'the tokenizer has only {len(single)} single-token words; fixed-length texts need more')
    return single


def fixed_length_texts(tokenizer: Any, tokens: int, count: int, seed: int) -> list[str]:
    """``count`` distinct texts of random whole words, each at least ``tokens`` tokens long, so that
    truncation at ``tokens`` (special tokens included) pads nothing."""
    words = word_vocabulary(tokenizer)
    rng = random.Random(seed)
    return [' '.join(rng.choices(words, k=tokens)) for _ in range(count)]


def tokenizer_source(assets: Path | None, workdir: Path) -> tuple[Path, str]:
    """A folder holding the tokenizer random models use, and its description: all-MiniLM-L6-v2's
    WordPiece vocabulary (bert-base-uncased's, 30,522 tokens) from the carried asset, or the test
    suite's tiny word-level tokenizer when no asset is at hand (dry runs)."""
    if assets is not None and (assets / MINILM_ASSET / 'tokenizer.json').exists():
        return assets / MINILM_ASSET, 'bert-base-uncased WordPiece (30,522 tokens)'
    from tests.support.tiny import make_tiny_bert

    folder = workdir / 'tiny-tokenizer'
    if not (folder / 'config.json').exists():
        make_tiny_bert(folder)
    return folder, 'the test suite tiny word-level tokenizer'


def describe_backbone(folder: Path) -> dict[str, int]:
    """Layers, hidden size and non-embedding parameters of a saved BERT folder (for the FLOP count)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), add_pooling_layer=False)
    return {
        'layers': int(config.num_hidden_layers),
        'hidden': int(config.hidden_size),
        'parameters': nonembedding_parameters(model),
        'all_parameters': sum(p.numel() for p in model.parameters()),
    }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
