"""The inference batches of ``Embedder.embed`` and the ONNX embedder (``plan_batches``): longest first,
cut where padding would cost more than another batch, the same batches on both paths."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from finetuner_trainer.models import BATCH_OVERHEAD_TOKENS, plan_batches


def _cost(lengths: list[int], batches: list[list[int]], overhead: int = BATCH_OVERHEAD_TOKENS) -> int:
    return sum(overhead + len(batch) * max(lengths[i] for i in batch) for batch in batches)


def _cheapest(lengths: list[int], batch_size: int, overhead: int = BATCH_OVERHEAD_TOKENS) -> float:
    """Every cut of the sorted lengths into batches of at most batch_size tried: the least cost."""
    ordered = sorted(lengths, reverse=True)
    best = [0.0] + [float('inf')] * len(ordered)
    for end in range(1, len(ordered) + 1):
        for start in range(max(0, end - batch_size), end):
            best[end] = min(best[end], best[start] + overhead + (end - start) * ordered[start])
    return best[-1]


def test_a_few_long_texts_get_a_batch_of_their_own() -> None:
    # 3 texts of 64 tokens and 61 of 8: in batches of 32 by length, 32 texts would be padded to 64.
    lengths = [8] * 30 + [64, 64, 64] + [8] * 31
    batches = plan_batches(lengths, 32)
    assert batches[0] == [30, 31, 32]
    assert all(len(batch) <= 32 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert _cost(lengths, batches) < _cost(lengths, [by_length[:32], by_length[32:]])  # plain chunks


def test_the_cuts_are_the_cheapest() -> None:
    rng = random.Random(0)
    for _ in range(200):
        batch_size = rng.randint(1, 40)
        lengths = [rng.choice([rng.randint(1, 8), rng.randint(1, 128)]) for _ in range(rng.randint(2, 90))]
        batches = plan_batches(lengths, batch_size)
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        flat = [i for batch in batches for i in batch]
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
        assert _cost(lengths, batches) == _cheapest(lengths, batch_size)


def test_equal_lengths_are_chunks_in_input_order() -> None:
    assert plan_batches([0] * 5, 2) == [[0, 1], [2, 3], [4]]
    assert plan_batches([7, 7, 7], 8) == [[0, 1, 2]]
    assert plan_batches([], 4) == []
    with pytest.raises(ValueError, match='batch_size must be at least 1'):
        plan_batches([1, 2], 0)


def test_torch_and_onnx_embed_in_the_same_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Embedder.embed`` and ``OnnxEmbedder.plan`` batch by token counts alike; embeddings match."""
    import numpy as np
    import torch

    from finetuner.api.layout import Record
    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.inference_onnx import OnnxEmbedder
    from finetuner_trainer.models import as_item, build_embedder
    from finetuner_trainer.onnx_export import export_onnx
    from tests.support.tiny import make_tiny_bert

    torch.manual_seed(0)
    embedder = build_embedder(FinetuneRunSpec(model=str(make_tiny_bert(tmp_path / 'bert')), train_data='x'))
    embedder.save(tmp_path / 'model')
    export_onnx(embedder, tmp_path / 'model' / 'onnx')
    long = ' '.join(['red green blue yellow'] * 6)
    texts = ['cat', long, 'a big dog', long + ' bird', 'fish', 'train and bus', 'sun', long, 'old car', 'pear']
    records = [Record(text=t) for t in texts]
    lengths = embedder.token_lengths(records)
    assert lengths[1] > lengths[0] and lengths[0] == len(embedder.tokenizer('cat')['input_ids'])
    batches = plan_batches(lengths, 4)
    assert set(batches[0]) == {1, 3, 7}  # the long texts in a batch of their own, not padding a 4th
    onnx_model = OnnxEmbedder.load(tmp_path / 'model')
    assert [positions for _, positions in onnx_model.plan([as_item(r) for r in records], 4)] == batches
    calls: list[int] = []
    original = type(embedder).collate

    def counting(self, values):  # type: ignore[no-untyped-def]
        calls.append(len(values))
        return original(self, values)

    monkeypatch.setattr(type(embedder), 'collate', counting)
    expected = embedder.embed(records, batch_size=4).numpy()
    assert calls == [len(batch) for batch in batches]
    np.testing.assert_allclose(onnx_model.encode(records, batch_size=4), expected, atol=1e-4)


def _tiny_text_embedder(tmp_path: Path) -> object:
    import torch

    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner_trainer.models import build_embedder
    from tests.support.tiny import make_tiny_bert

    torch.manual_seed(0)
    return build_embedder(FinetuneRunSpec(model=str(make_tiny_bert(tmp_path / 'bert')), train_data='x'))


def test_a_training_batch_of_mixed_lengths_is_cut_into_parts_with_the_same_embeddings(tmp_path: Path) -> None:
    """``collate(plan_lengths=True)``: the texts of one batch go through the model in parts cut by
    token count (less padding); the batch's embeddings, in its order, and their gradients are the
    plain batch's."""
    import torch

    from finetuner.api.layout import Record

    embedder = _tiny_text_embedder(tmp_path)
    long = ' '.join(['red green blue yellow'] * 8)
    texts = ['cat', long, 'a big dog', 'fish', long + ' bird', 'sun', 'pear', 'old car'] * 2
    records = [Record(text=t) for t in texts]
    plain = embedder.collate(records)  # type: ignore[attr-defined]
    split = embedder.collate(records, plan_lengths=True)  # type: ignore[attr-defined]
    assert len(plain['parts']) == 1
    assert len(split['parts']) > 1
    assert sorted(i for _, _, positions in split['parts'] for i in positions) == list(range(len(texts)))
    padded = {
        name: sum(inputs['input_ids'].numel() for _, inputs, _ in batch['parts'])
        for name, batch in (('plain', plain), ('split', split))
    }
    assert padded['split'] < padded['plain'] / 2  # 4 long texts no longer pad 12 short ones
    embedder.eval()  # type: ignore[attr-defined]
    out_plain, out_split = embedder(plain), embedder(split)  # type: ignore[operator]
    torch.testing.assert_close(out_split, out_plain, atol=1e-5, rtol=1e-4)
    weight = next(p for p in embedder.parameters() if p.requires_grad)  # type: ignore[attr-defined]
    grads = []
    for out in (out_plain, out_split):
        (grad,) = torch.autograd.grad(out.pow(2).sum(), weight, retain_graph=True)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)


def test_a_batch_the_plan_keeps_whole_stays_in_input_order(tmp_path: Path) -> None:
    from finetuner.api.layout import Record

    embedder = _tiny_text_embedder(tmp_path)
    records = [Record(text=t) for t in ['a', 'a big dog', 'sun', 'an old red car']]  # similar lengths
    batch = embedder.collate(records, plan_lengths=True)  # type: ignore[attr-defined]
    assert [positions for _, _, positions in batch['parts']] == [[0, 1, 2, 3]]


def test_the_trainer_cuts_text_batches_on_the_cpu(tmp_path: Path) -> None:
    """The training collator of a CPU run plans its text batches by length; both sides of pairs."""
    from finetuner.api.layout import Record
    from finetuner_trainer.data import Shape
    from finetuner_trainer.runner import Collator

    embedder = _tiny_text_embedder(tmp_path)
    long = ' '.join(['red green blue yellow'] * 8)

    class Example:
        def __init__(self, query: str, document: str):
            self.items = [Record(text=query), Record(text=document)]

    documents = [long, 'sun', 'car', long + ' x', 'bus', 'pear', 'dog', 'cat']
    examples = [Example(f'query {i}', document) for i, document in enumerate(documents)]
    batch = Collator(embedder, Shape.PAIRS, plan_lengths=True)(examples)
    queries, documents = batch['groups']
    assert [p for _, _, p in queries['parts']] == [list(range(8))]  # one length: one part, in order
    assert [sorted(p) for _, _, p in documents['parts']] == [[0, 3], [1, 2, 4, 5, 6, 7]]
    assert len(Collator(embedder, Shape.PAIRS)(examples)['groups'][1]['parts']) == 1
