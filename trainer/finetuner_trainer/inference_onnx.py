"""Embedding with the ONNX graphs of an artifact (``get_model(..., is_onnx=True).encode(...)``).

The artifact folder holds the model in its library's format plus ``onnx/`` (see
:mod:`finetuner_trainer.onnx_export`). Preprocessing follows the embedder's own, read from the same
folder, without torch tensors in between where the family provides it (``Embedder.onnx_feeder``):

- text encoders: the artifact's (fast) tokenizer with dynamic padding, returning int64 numpy arrays;
- timm images: the numpy version of the timm transform (:mod:`finetuner_trainer.numpy_images`);
- anything else (CLIP, tensors, an unfamiliar transform): the embedder's own ``collate_kind``.

Texts are batched longest first by token count, in the batches the torch embedder uses
(:func:`~finetuner_trainer.embedder.plan_batches`), so that a batch pads to a length close to its
texts' own (embeddings are returned in input order). The network itself runs in ONNX Runtime with
all graph optimisations on, on as many threads as the process has CPUs (its container's CPU quota
included: :func:`~finetuner_trainer.cpus.available_cpus`), with denormal floats flushed to zero
(:func:`~finetuner_trainer.onnx_export.flush_denormals`). An artifact with int8 graphs
(``onnxQuantize``, :mod:`finetuner_trainer.quantization`) is loaded with them unless the float ones
are asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetuner.api.layout import Record
from finetuner_trainer.cpus import available_cpus
from finetuner_trainer.data import Item
from finetuner_trainer.embedder import Embedder, OnnxFeeder, as_item, plan_batches
from finetuner_trainer.models import load_embedder
from finetuner_trainer.onnx_export import EXPORT_MANIFEST, ONNX_DIR, OUTPUT_NAME, flush_denormals, ort_session

__all__ = ['OnnxEmbedder', 'available_cpus']  # available_cpus: bench.common counts cores with it


class OnnxEmbedder:
    """ONNX Runtime sessions for each kind of content (image, text) and the preprocessing that feeds them."""

    def __init__(
        self,
        preprocessor: Embedder,
        sessions: dict[str, Any],
        inputs: dict[str, list[str]],
        threads: int | None = None,
    ):
        self.preprocessor = preprocessor
        self.sessions = sessions
        self.inputs = inputs
        self.precision = 'float32'  # 'int8' for the quantised graphs (onnxQuantize)
        self.quantization: dict[str, str] = {}  # kind -> dynamic or static, for int8 graphs
        # The family's numpy preprocessing per kind of content (made once: it may hold threads and buffers).
        self.feeders: dict[str, OnnxFeeder] = {}
        for kind in preprocessor.kinds:
            graph_kind = self._graph_kind_of(kind)
            feeder = preprocessor.onnx_feeder(kind, inputs[graph_kind], threads) if graph_kind in inputs else None
            if feeder is not None:
                self.feeders[kind] = feeder

    @classmethod
    def load(cls, directory: Path | str, threads: int | None = None, quantized: bool | None = None) -> OnnxEmbedder:
        """Open an artifact folder that contains ``onnx/export.json`` (a run with ``toOnnx: true``).

        ``quantized``: None takes the int8 graphs when the artifact has them (``onnxQuantize``), else the
        float ones; True insists on the int8 graphs, False takes the float ones."""
        directory = Path(directory)
        return cls.from_manifest(directory, load_embedder(directory), threads, quantized)

    @classmethod
    def from_manifest(
        cls, directory: Path, preprocessor: Embedder, threads: int | None = None, quantized: bool | None = None
    ) -> OnnxEmbedder:
        """The graphs of the artifact folder ``directory`` with ``preprocessor`` (an embedder of the same
        model: only its preprocessing is used) making their inputs."""
        manifest_path = directory / ONNX_DIR / EXPORT_MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(
                f'{directory} has no ONNX model ({ONNX_DIR}/{EXPORT_MANIFEST}); fine-tune with to_onnx=True '
                'to get one, or load the model without is_onnx'
            )
        manifest = json.loads(manifest_path.read_text())
        int8 = manifest.get('quantized') or {}
        if quantized and not int8:
            raise FileNotFoundError(
                f'{directory} has no int8 ONNX model; fine-tune with to_onnx=True and onnx_quantize="auto" to get '
                'one, or load the float ONNX model (quantized=None or False)'
            )
        use_int8 = bool(int8) and quantized is not False
        graphs = manifest['graphs']
        files = {kind: (int8[kind]['file'] if use_int8 else graph['file']) for kind, graph in graphs.items()}
        sessions = {kind: ort_session(directory / ONNX_DIR / file, threads) for kind, file in files.items()}
        inputs = {kind: list(graph['inputs']) for kind, graph in graphs.items()}
        embedder = cls(preprocessor, sessions, inputs, threads)
        embedder.precision = 'int8' if use_int8 else 'float32'
        embedder.quantization = {kind: int8[kind]['method'] for kind in graphs} if use_int8 else {}
        return embedder

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.sessions)

    def _graph_kind_of(self, kind: str) -> str:
        return 'image' if kind == 'tensor' and 'image' in self.sessions else kind

    def graph_kind(self, kind: str) -> str:
        graph_kind = self._graph_kind_of(kind)
        if graph_kind not in self.sessions:
            raise ValueError(f'this ONNX model embeds {", ".join(self.kinds)}, not {kind}')
        return graph_kind

    def feeds(self, kind: str, items: Sequence[Item]) -> dict[str, np.ndarray]:
        """The graph inputs (numpy) for items of one kind, made by the artifact's preprocessing.

        Image pixels may be written into a buffer that the next call reuses: copy them to keep them."""
        names = self.inputs[self.graph_kind(kind)]
        feeder = self.feeders.get(kind)
        if feeder is not None:
            return feeder(items)
        inputs = self.preprocessor.collate_kind(kind, list(items))
        return {name: inputs[name].cpu().numpy() for name in names}

    def run(self, kind: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph of ``kind`` on ``feeds``, denormals flushed to zero on this thread while it runs
        (:func:`~finetuner_trainer.onnx_export.flush_denormals`; the thread's own setting is restored)."""
        with flush_denormals():
            (embeddings,) = self.sessions[self.graph_kind(kind)].run([OUTPUT_NAME], feeds)
        return embeddings

    def plan(self, items: Sequence[Item], batch_size: int) -> list[tuple[str, list[int]]]:
        """The batches :meth:`encode` runs: (kind, positions of its items), at most ``batch_size`` each.

        Items are grouped by kind; within a kind the batches are the torch embedder's
        (:func:`~finetuner_trainer.embedder.plan_batches` over the tokenizer's counts): texts longest
        first, cut where padding would cost more than another batch; images in input order."""
        if batch_size < 1:
            raise ValueError(f'batch_size must be at least 1, got {batch_size}')
        batches = []
        for kind in sorted({item.kind for item in items}):
            positions = [i for i, item in enumerate(items) if item.kind == kind]
            lengths = self.preprocessor.token_lengths([items[i] for i in positions]) if kind == 'text' else None
            for chosen in plan_batches(lengths or [0] * len(positions), batch_size):
                batches.append((kind, [positions[i] for i in chosen]))
        return batches

    def encode(self, records: Sequence[Record | Any], batch_size: int = 32) -> np.ndarray:
        """(n, dim) float32 embeddings of records (or items), in input order (batches: :meth:`plan`)."""
        items = [as_item(record) for record in records]
        out: np.ndarray | None = None
        for kind, chosen in self.plan(items, batch_size):
            embeddings = self.run(kind, self.feeds(kind, [items[i] for i in chosen]))
            if out is None:
                out = np.zeros((len(items), embeddings.shape[-1]), dtype=np.float32)
            out[np.asarray(chosen)] = embeddings
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)
