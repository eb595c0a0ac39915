"""Synthesis runs (``task: synthesis``): training data from unlabelled queries and a corpus.

The run's ``model`` embeds the corpus (``synthesis.corpusData``) and the queries (``trainData``);
each query's ``numRelations`` closest documents (never the query's own text) are scored by the
cross-encoder (``synthesis.crossEncoder``), and the run publishes one scored tuple per query,
(query, documents best-scored first, each with its score), as ``artifact/data.jsonl``: data that
``fit(loss='MarginMSELoss', train_data=run.train_data)`` distils the cross-encoder's judgement from.

It is a run like any other: progress in ``progress.json``, its log, a summary in ``metrics.json``
(records, mean scores), the artifact published files first and ``artifact/manifest.json`` last, and
resume: the corpus embeddings and every finished chunk of queries are kept under ``checkpoints/``,
so a retried pod goes on where the last one stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from finetuner.api import layout
from finetuner.api.layout import Record
from finetuner.api.mining import SYNTHESIS_DATA, SYNTHESIS_FORMAT, SynthesisOptions
from finetuner.api.v1alpha1 import Progress, TrainerConfig
from finetuner_trainer.cross_encoder import CrossEncoderScorer
from finetuner_trainer.data import Item, load_records
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.mining import ProgressLog, embed, search_method, top_k
from finetuner_trainer.models import build_embedder

QUERY_CHUNK = 512  # queries per checkpointed part
PARTS = f'{layout.CHECKPOINTS}/synthesis'
CORPUS_EMBEDDINGS = f'{PARTS}/corpus-embeddings.pt'
FINGERPRINT = f'{PARTS}/fingerprint.json'


@dataclass
class SynthesisResult:
    artifact_uri: str
    records: int
    metrics: dict[str, float]


def read_texts(reference: str, config: TrainerConfig, field: str) -> list[str]:
    """The texts of a dataset of text items; a record without text is refused, naming it."""
    records, _ = load_records(reference, config.data_uri, config.spec.csv_options, field)
    texts = []
    for number, record in enumerate(records, 1):
        if record.text is None or not record.text.strip():
            what = 'chunks' if record.chunks else 'empty text' if record.text is not None else record.content_kind
            raise ConfigError(
                field,
                f'record {number} has no text ({what}): synthesis reads texts, so give every query and document '
                'as a record with "text"',
            )
        texts.append(record.text)
    return texts


class SynthesisProgress:
    """progress.json (every two seconds at most) and log lines while a synthesis run goes."""

    def __init__(self, store: Any, log: logging.Logger, total: int) -> None:
        self.store, self.total, self.started, self.last = store, max(total, 1), time.monotonic(), 0.0
        self.log_progress = ProgressLog(log)

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.log_progress(stage, done, total)

    def queries_done(self, done: int, resumed: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 2.0:
            return
        self.last = now
        fresh = done - resumed
        eta = (now - self.started) / fresh * (self.total - done) if fresh > 0 else None
        progress = Progress(
            epoch=1,
            epochs=1,
            step=done,
            total_steps=self.total,
            percent=round(100.0 * done / self.total, 2),
            eta_seconds=None if eta is None else round(eta, 1),
            updated_at=datetime.now(timezone.utc).isoformat(timespec='seconds'),
        )
        self.store.write_json(layout.PROGRESS, progress.model_dump(by_alias=True, mode='json', exclude_none=True))


def _fingerprint(config: TrainerConfig, queries: list[str], corpus: list[str]) -> dict[str, Any]:
    spec = config.spec
    assert spec.synthesis is not None
    digest = hashlib.sha256('\x00'.join([*queries, '\x01', *corpus]).encode()).hexdigest()
    return {
        'model': spec.model,
        'crossEncoder': spec.synthesis.cross_encoder,
        'numRelations': spec.synthesis.num_relations,
        'queries': len(queries),
        'corpus': len(corpus),
        'chunk': QUERY_CHUNK,
        'digest': digest,
    }


def _corpus_embeddings(store: Any, model: Any, corpus: list[Item], options: SynthesisOptions, report: Any) -> Any:
    """The corpus embeddings: from the checkpoint of an earlier attempt, else computed and kept there."""
    if store.exists(CORPUS_EMBEDDINGS):
        return torch.load(io.BytesIO(store.read_bytes(CORPUS_EMBEDDINGS)), weights_only=True)
    embeddings = embed(model, corpus, options.batch_size, report, 'embedding the corpus')
    buffer = io.BytesIO()
    torch.save(embeddings, buffer)
    store.write_bytes(CORPUS_EMBEDDINGS, buffer.getvalue())
    return embeddings


def _part_key(index: int) -> str:
    return f'{PARTS}/part-{index:05d}.jsonl'


def _score_chunk(
    queries: list[str],
    corpus: list[str],
    found: torch.Tensor,
    scorer: CrossEncoderScorer,
    options: SynthesisOptions,
) -> list[Record]:
    """One scored tuple per query: (query, its documents best-scored first, each with its score)."""
    picked: list[list[int]] = []
    for q, row in enumerate(found.tolist()):
        documents = [d for d in row if d >= 0 and corpus[d] != queries[q]][: options.num_relations]
        picked.append(documents)
    pairs = [(queries[q], corpus[d]) for q, docs in enumerate(picked) for d in docs]
    scores = scorer.score(pairs, batch_size=options.batch_size).tolist()
    records, position = [], 0
    for q, docs in enumerate(picked):
        scored = sorted(zip(docs, scores[position : position + len(docs)], strict=True), key=lambda p: -p[1])
        position += len(docs)
        chunks = [Record(text=queries[q])] + [Record(text=corpus[d], score=round(s, 6)) for d, s in scored]
        records.append(Record(chunks=chunks))
    return records


def _dump(records: list[Record]) -> bytes:
    return ''.join(json.dumps(r.model_dump(exclude_none=True, exclude_defaults=True)) + '\n' for r in records).encode()


def load_inputs(config: TrainerConfig) -> tuple[list[str], list[str]]:
    """(unique queries, unique documents), checked against ``numRelations``."""
    spec = config.spec
    options = spec.synthesis
    if options is None:
        raise ConfigError('synthesis', 'task synthesis needs synthesis (corpusData and crossEncoder)')
    queries = list(dict.fromkeys(read_texts(spec.train_data, config, 'trainData')))
    corpus = list(dict.fromkeys(read_texts(options.corpus_data, config, 'synthesis.corpusData')))
    if options.num_relations > len(corpus):
        raise ConfigError(
            'synthesis.numRelations',
            f'{options.num_relations} relations per query, but the corpus holds {len(corpus)} distinct documents; '
            f'lower numRelations to at most {len(corpus)} or give a larger corpus',
        )
    return queries, corpus


def synthesize(config: TrainerConfig, store: Any, device: torch.device, log: logging.Logger) -> SynthesisResult:
    """The whole synthesis run; raises ConfigError on a user mistake (see the module docstring)."""
    spec = config.spec
    options = spec.synthesis
    assert options is not None
    queries, corpus = load_inputs(config)
    log.info(
        'synthesis: %d queries, %d documents, %d relations per query', len(queries), len(corpus), options.num_relations
    )
    scorer = CrossEncoderScorer.load(options.cross_encoder, 'synthesis.crossEncoder', device, options.max_length)
    model = build_embedder(spec).to(device)
    fingerprint = _fingerprint(config, queries, corpus)
    if store.read_json_or_none(FINGERPRINT) != fingerprint:
        store.delete(PARTS)  # another configuration's checkpoints (or none): start afresh
        store.write_json(FINGERPRINT, fingerprint)
    progress = SynthesisProgress(store, log, len(queries))
    store.delete(layout.ARTIFACT_MANIFEST)
    corpus_emb = _corpus_embeddings(store, model, [Item(text=t) for t in corpus], options, progress)
    method = search_method(options.search, len(corpus))
    parts, resumed = [], 0
    for index, start in enumerate(range(0, len(queries), QUERY_CHUNK)):
        key, chunk = _part_key(index), queries[start : start + QUERY_CHUNK]
        if store.exists(key):
            resumed = start + len(chunk)
        else:
            query_emb = embed(model, [Item(text=t) for t in chunk], options.batch_size, progress, 'embedding queries')
            _, found = top_k(query_emb, corpus_emb, options.num_relations + 1, method)
            store.write_bytes(key, _dump(_score_chunk(chunk, corpus, found, scorer, options)))
        parts.append(key)
        progress.queries_done(start + len(chunk), resumed, force=start + len(chunk) == len(queries))
        progress('queries related and scored', start + len(chunk), len(queries))
    if resumed:
        log.info('resumed: %d queries were done by an earlier attempt', resumed)
    return _publish(config, store, parts, method)


def _publish(config: TrainerConfig, store: Any, parts: list[str], method: str) -> SynthesisResult:
    """artifact/data.jsonl, then metrics.json, then artifact/manifest.json last."""
    data = b''.join(store.read_bytes(key) for key in parts)
    records = [Record.model_validate_json(line) for line in data.decode().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix='finetuner-synthesis-') as tmp:
        path = Path(tmp) / 'data.jsonl'
        path.write_bytes(data)
        store.upload_file(path, SYNTHESIS_DATA)
    metrics = summary(records)
    store.write_json(layout.METRICS, {'before': {}, 'after': metrics, 'epochs': []})
    spec = config.spec
    assert spec.synthesis is not None
    manifest = {
        'format': SYNTHESIS_FORMAT,
        'task': 'synthesis',
        'data': SYNTHESIS_DATA.removeprefix(f'{layout.ARTIFACT}/'),
        'records': len(records),
        'model': spec.model,
        'cross_encoder': spec.synthesis.cross_encoder,
        'num_relations': spec.synthesis.num_relations,
        'search': method,
        'files': {SYNTHESIS_DATA.removeprefix(f'{layout.ARTIFACT}/'): len(data)},
        'spec': spec.to_k8s(),
        'run_name': config.run_name,
        'created_at': datetime.now(timezone.utc).isoformat(timespec='seconds'),
    }
    store.write_json(layout.ARTIFACT_MANIFEST, manifest)
    return SynthesisResult(f'{store.uri}/{layout.ARTIFACT}', len(records), metrics)


def summary(records: list[Record]) -> dict[str, float]:
    """metrics.json's ``after`` of a synthesis run: how much data, and how the cross-encoder scored it."""
    best = [r.chunks[1].score or 0.0 for r in records if len(r.chunks) > 1]
    worst = [r.chunks[-1].score or 0.0 for r in records if len(r.chunks) > 1]
    every = [c.score or 0.0 for r in records for c in r.chunks[1:]]
    return {
        'records': float(len(records)),
        'pairs': float(len(every)),
        'mean_score': statistics.fmean(every) if every else 0.0,
        'mean_best_score': statistics.fmean(best) if best else 0.0,
        'mean_margin': statistics.fmean(b - w for b, w in zip(best, worst, strict=True)) if best else 0.0,
    }
