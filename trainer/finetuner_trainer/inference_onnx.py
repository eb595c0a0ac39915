"""Embedding with the ONNX graphs of an artifact (``get_model(..., is_onnx=True).encode(...)``).

The artifact folder holds the model in its library's format plus ``onnx/`` (see
:mod:`finetuner_trainer.onnx_export`). Preprocessing (tokenizer, image transform) is the embedder's
own, read from the same folder, so ONNX and torch see identical inputs; the network itself runs in
ONNX Runtime with all graph optimisations on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetuner.api.layout import Record
from finetuner_trainer.onnx_export import EXPORT_MANIFEST, ONNX_DIR, OUTPUT_NAME, ort_session


class OnnxEmbedder:
    """ONNX Runtime sessions for each kind of content (image, text) and the preprocessing that feeds them."""

    def __init__(self, preprocessor: Any, sessions: dict[str, Any], inputs: dict[str, list[str]]):
        self.preprocessor = preprocessor
        self.sessions = sessions
        self.inputs = inputs

    @classmethod
    def load(cls, directory: Path | str, threads: int | None = None) -> OnnxEmbedder:
        """Open an artifact folder that contains ``onnx/export.json`` (a run with ``toOnnx: true``)."""
        directory = Path(directory)
        manifest_path = directory / ONNX_DIR / EXPORT_MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(
                f'{directory} has no ONNX model ({ONNX_DIR}/{EXPORT_MANIFEST}); fine-tune with to_onnx=True '
                'to get one, or load the model without is_onnx'
            )
        manifest = json.loads(manifest_path.read_text())
        from finetuner_trainer.models import load_embedder

        preprocessor = load_embedder(directory)
        sessions = {
            kind: ort_session(directory / ONNX_DIR / graph['file'], threads)
            for kind, graph in manifest['graphs'].items()
        }
        inputs = {kind: list(graph['inputs']) for kind, graph in manifest['graphs'].items()}
        return cls(preprocessor, sessions, inputs)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.sessions)

    def encode(self, records: Sequence[Record | Any], batch_size: int = 32) -> np.ndarray:
        """(n, dim) float32 embeddings of records (or items), in order."""
        chunks = []
        for start in range(0, len(records), batch_size):
            batch = self.preprocessor.collate(list(records[start : start + batch_size]))
            out: np.ndarray | None = None
            for kind, inputs, positions in batch['parts']:
                graph_kind = 'image' if kind == 'tensor' and 'image' in self.sessions else kind
                if graph_kind not in self.sessions:
                    raise ValueError(f'this ONNX model embeds {", ".join(self.kinds)}, not {kind}')
                feeds = {name: inputs[name].cpu().numpy() for name in self.inputs[graph_kind]}
                (embeddings,) = self.sessions[graph_kind].run([OUTPUT_NAME], feeds)
                if out is None:
                    out = np.zeros((batch['size'], embeddings.shape[-1]), dtype=np.float32)
                out[np.asarray(positions)] = embeddings
            if out is not None:
                chunks.append(out)
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(chunks)
