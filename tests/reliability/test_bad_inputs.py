"""The bad-input catalogue: one table row per distinct mistake, refused at the earliest layer that sees it.

Layers, earliest first:

- ``contract``: a FinetuneRun field the shared contract (``FinetuneRunSpec``) refuses. The SDK
  validates the same model before it uploads anything; for a CR applied by hand the operator
  fails the run with ``InvalidSpec`` before any child exists. ``crd`` says whether the CRD's
  OpenAPI schema already makes the API server refuse it (types, ranges, enums, patterns); the combination
  rows are refused by the CRD's CEL rules too (tests/cluster/test_apiserver.py, test_kubectl.py), which
  the jsonschema check here does not run.
- ``operator``: a spec the contract accepts that the operator cannot run (a name too long for the
  run's children, a location the trainer cannot use, a dataset name that climbs out of its prefix):
  ``InvalidSpec``, nothing created.
- ``sdk``: an argument or local file of ``finetuner.fit()`` and friends: ``ArgumentError`` naming the
  argument, before any upload or submission.
- ``trainer``: only the trainer reads the data and builds the model: it exits with
  ``EXIT_CONFIG_ERROR`` (3) and writes a one-line reason naming the field, so the Job's pod failure
  policy fails the run at once (no retry, no crash loop; see the cluster tests at the end).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import finetuner
from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR, FinetuneRunSpec, TrainerConfig
from finetuner.backends.local import LocalBackend
from finetuner.errors import ArgumentError
from finetuner_operator.config import OperatorConfig
from finetuner_operator.reconcile import Reconciler
from tests.operator.test_op_reconcile import NOW, FakeKube, Reports
from tests.support.tiny import TINY_TIMM, TINY_TIMM_OPTIONS, labelled_images, labelled_texts, png_bytes, text_pairs

ROOT = Path(__file__).resolve().parents[2]
BASE_SPEC = {'model': 'timm:test_resnet', 'trainData': 's3://bucket/data/train.jsonl'}


@dataclass(frozen=True)
class Row:
    id: str
    layer: str  # contract, operator, sdk, trainer
    input: Any  # a spec patch, fit() arguments, or data files
    expected: str  # a part of the message the user gets
    crd: bool = False  # contract rows: the CRD schema refuses it too
    spec: dict[str, Any] = field(default_factory=dict)  # trainer rows: spec fields besides the data
    name: str = 'bad-input'  # operator rows: the run's name
    call: str = 'fit'  # sdk rows: the function given the arguments (fit, synthesize, mine_hard_negatives)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels in a few bytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (
        b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b'')
    )


def _jsonl(*rows: dict[str, Any]) -> bytes:
    return ''.join(json.dumps(row) + '\n' for row in rows).encode()


def _blob(data: bytes, label: str) -> dict[str, Any]:
    return {'blob': base64.b64encode(data).decode(), 'label': label}


def _ambiguous_tensor() -> list[Any]:
    """Pixels of shape 3 x 32 x 4: channels first (3) or last (4)? Neither can be told."""
    return [[[0] * 4 for _ in range(32)] for _ in range(3)]


def _image_pair(seed: int) -> dict[str, Any]:
    chunks = [{'blob': _blob(png_bytes(color, seed=seed), '')['blob']} for color in ((200, 0, 0), (0, 0, 200))]
    return {'chunks': chunks}


IMAGE_PAIRS = _jsonl(*(_image_pair(seed) for seed in range(4)))
GOOD_IMAGES = _jsonl(*(r.model_dump(exclude_defaults=True) for r in labelled_images(n_classes=2, per_class=2)))
PAIRS = _jsonl(*(r.model_dump(exclude_defaults=True) for r in text_pairs(n=4)))
TEXTS = _jsonl(*({'text': f'item {i}', 'label': f'c{i % 2}'} for i in range(4)))
SYNTHESIS = {'corpusData': 's3://b/corpus.jsonl', 'crossEncoder': 'cross-encoder/ms-marco-MiniLM-L6-v2'}

ROWS: list[Row] = [
    # --- CR fields: types and ranges ---------------------------------------------------------------
    Row('epochs-type', 'contract', {'epochs': 'five'}, 'spec.epochs: Input should be a valid integer', crd=True),
    Row('epochs-range', 'contract', {'epochs': 0}, 'spec.epochs: Input should be greater than or equal to 1', crd=True),
    Row(
        'learning-rate-range', 'contract', {'learningRate': 5}, 'spec.learningRate: Input should be less than', crd=True
    ),
    Row('batch-size-range', 'contract', {'batchSize': -1}, 'spec.batchSize: Input should be greater', crd=True),
    Row('val-split-range', 'contract', {'valSplit': 1.5}, 'spec.valSplit: Input should be less than 1', crd=True),
    Row('gpus-range', 'contract', {'resources': {'gpus': 17}}, 'spec.resources.gpus: Input should be less', crd=True),
    Row(
        'memory-quantity',
        'contract',
        {'resources': {'memory': 'lots'}},
        "'lots' is not a Kubernetes quantity",
        crd=True,
    ),
    Row('deadline-range', 'contract', {'activeDeadlineSeconds': 10}, 'spec.activeDeadlineSeconds', crd=True),
    Row('backoff-range', 'contract', {'backoffLimit': 100}, 'spec.backoffLimit: Input should be less', crd=True),
    Row('model-empty', 'contract', {'model': ''}, 'spec.model: String should have at least 1 character', crd=True),
    Row('train-data-missing', 'contract', {'trainData': None}, 'spec.trainData: Field required', crd=True),
    Row(
        'toleration-operator',
        'contract',
        {'tolerations': [{'operator': 'Maybe'}]},
        'spec.tolerations.0.operator',
        crd=True,
    ),
    Row('unknown-field', 'contract', {'epoch': 3}, 'spec.epoch: unknown field (check the spelling'),
    # --- CR fields: unknown names -----------------------------------------------------------------
    Row('loss-unknown', 'contract', {'loss': 'TripletLoss'}, "unknown loss 'TripletLoss'; choose one of", crd=True),
    Row('loss-case', 'contract', {'loss': 'tripletmarginloss'}, "did you mean 'TripletMarginLoss'?", crd=True),
    Row('miner-unknown', 'contract', {'miner': 'HardMiner'}, "spec.miner: unknown miner 'HardMiner'", crd=True),
    Row(
        'optimizer-unknown',
        'contract',
        {'optimizer': 'adamw'},
        "unknown optimizer 'adamw'; did you mean 'AdamW'?",
        crd=True,
    ),
    Row('loss-optimizer-unknown', 'contract', {'lossOptimizer': 'Fast'}, "unknown lossOptimizer 'Fast'", crd=True),
    Row(
        'scheduler-unknown',
        'contract',
        {'scheduler': 'cosine_annealing'},
        "unknown scheduler 'cosine_annealing'",
        crd=True,
    ),
    Row(
        'callback-unknown', 'contract', {'callbacks': [{'name': 'EarlyStop'}]}, "unknown callback 'EarlyStop'", crd=True
    ),
    Row('csv-dialect', 'contract', {'csvOptions': {'dialect': 'tsv'}}, "unknown CSV dialect 'tsv'", crd=True),
    Row(
        'experiment-name',
        'contract',
        {'experiment': 'My_Exp'},
        "spec.experiment: experiment 'My_Exp' is not a valid name",
        crd=True,
    ),
    # --- CR fields: combinations --------------------------------------------------------------------
    Row('clip-loss-without-multimodal', 'contract', {'loss': 'CLIPLoss'}, 'loss CLIPLoss needs multiModal: true'),
    Row(
        'multimodal-without-clip-loss',
        'contract',
        {'multiModal': True, 'loss': 'TripletMarginLoss'},
        'set loss CLIPLoss',
    ),
    Row(
        'eval-data-and-val-split',
        'contract',
        {'valSplit': 0.2, 'evalData': 's3://b/e.jsonl'},
        'either evalData or valSplit',
    ),
    Row(
        'miner-options-without-miner', 'contract', {'minerOptions': {'margin': 0.1}}, 'minerOptions given without miner'
    ),
    Row('task-unknown', 'contract', {'task': 'mine'}, "spec.task: Input should be 'finetune' or 'synthesis'", crd=True),
    Row('synthesis-without-options', 'contract', {'task': 'synthesis'}, 'task synthesis needs synthesis (corpusData'),
    Row(
        'synthesis-options-without-task',
        'contract',
        {'synthesis': SYNTHESIS},
        'synthesis options are for task synthesis; set task: synthesis',
    ),
    Row(
        'synthesis-num-relations-range',
        'contract',
        {'task': 'synthesis', 'synthesis': {**SYNTHESIS, 'numRelations': 0}},
        'spec.synthesis.numRelations: Input should be greater than or equal to 1',
        crd=True,
    ),
    Row(
        'synthesis-on-several-gpus',
        'contract',
        {'task': 'synthesis', 'synthesis': SYNTHESIS, 'resources': {'gpus': 2}},
        'a synthesis run uses one node and at most one GPU',
    ),
    Row(
        'hard-negatives-window',
        'contract',
        {'hardNegatives': {'numNegatives': 5, 'rangeMin': 3, 'rangeMax': 6}},
        'numNegatives 5 do not fit between rangeMin 3 and rangeMax 6',
    ),
    Row(
        'hard-negatives-in-synthesis',
        'contract',
        {'task': 'synthesis', 'synthesis': SYNTHESIS, 'hardNegatives': {}},
        'hardNegatives are mined before fine-tuning; a synthesis run takes none',
    ),
    Row(
        'oversized-spec',
        'contract',
        {'lossOptions': {'inline': 'x' * 300_000}},
        'over the limit of 256 KiB (lossOptions alone is 292 KiB)',
    ),
    # --- what only the operator sees ----------------------------------------------------------------
    Row('name-too-long-for-children', 'operator', {}, "metadata.name: 'r" + 'x' * 59, name='r' + 'x' * 59),
    Row('output-scheme', 'operator', {'output': 'http://store/runs'}, "spec.output: 'http://store/runs' uses http://"),
    Row('train-data-scheme', 'operator', {'trainData': 'https://h/d.jsonl'}, 'give an s3:// or file:// URI'),
    Row(
        'uri-path-traversal', 'operator', {'trainData': 's3://b/t/../../x.jsonl'}, "climbs out of its prefix with '..'"
    ),
    Row(
        'dataset-name-traversal',
        'operator',
        {'trainData': '../../secrets'},
        "spec.trainData: dataset name '../../secrets'",
    ),
    Row(
        'corpus-dataset-name',
        'operator',
        {'task': 'synthesis', 'synthesis': {**SYNTHESIS, 'corpusData': '../corpus'}},
        "spec.synthesis.corpusData: dataset name '../corpus'",
    ),
    Row(
        'eval-dataset-name',
        'operator',
        {'evalData': 'Eval Set'},
        "spec.evalData: dataset name 'Eval Set' is not a valid",
    ),
    # --- SDK arguments ---------------------------------------------------------------------------------
    Row('unknown-argument', 'sdk', {'epoch': 3}, "epoch: fit() has no argument 'epoch'; did you mean 'epochs'?"),
    Row('run-name-invalid', 'sdk', {'run_name': 'My Run'}, "run_name: 'My Run' is not a valid name"),
    Row('run-name-too-long', 'sdk', {'run_name': 'x' * 60}, 'run_name: ' + repr('x' * 60) + ' is 60 characters long'),
    Row('experiment-name-invalid', 'sdk', {'experiment_name': 'Exp_1'}, "experiment_name: 'Exp_1' is not a valid name"),
    Row('cpu-contradicts-device', 'sdk', {'cpu': True, 'device': 'cuda'}, "cpu: cpu=True contradicts device='cuda'"),
    Row('train-data-none', 'sdk', {'train_data': None}, 'train_data: is required'),
    Row(
        'train-data-no-such-path',
        'sdk',
        {'train_data': '/no/such/train.csv'},
        "train_data: no file or folder '/no/such",
    ),
    Row('train-data-ftp', 'sdk', {'train_data': 'ftp://host/x.csv'}, 'uses an unsupported scheme; use s3://'),
    Row('train-data-empty', 'sdk', {'train_data': []}, 'train_data: is empty; give at least one document'),
    Row('no-such-dataset', 'sdk', {'train_data': 'my-set'}, "train_data: no dataset named 'my-set'"),
    Row('callback-not-a-callback', 'sdk', {'callbacks': [object()]}, 'callbacks[0]: a object is not a callback'),
    Row('model-blank', 'sdk', {'model': ' '}, 'model: give a backbone name'),
    Row(
        'backbone-typo',
        'sdk',
        {'model': 'efficentnet_b0'},
        "model: unknown backbone 'efficentnet_b0'; did you mean 'efficientnet_b0'?",
    ),
    Row(
        'multimodal-non-clip',
        'sdk',
        {'model': 'efficientnet_b0', 'multi_modal': True, 'loss': 'CLIPLoss'},
        'needs a CLIP',
    ),
    Row(
        'modality-without-multimodal', 'sdk', {'image_modality': 'image'}, 'image_modality: only applies to multi_modal'
    ),
    Row('oversized-arguments', 'sdk', {'loss_options': {'inline': 'x' * 300_000}}, 'loss_options: the spec is'),
    Row('fit-another-task', 'sdk', {'task': 'synthesis'}, 'task: fit() fine-tunes a model; a synthesis run comes from'),
    Row(
        'fit-hard-negatives-range',
        'sdk',
        {'hard_negatives': {'num_negatives': 0}},
        'hard_negatives.num_negatives: must be greater than or equal to 1',
    ),
    Row('synthesis-empty-corpus', 'sdk', {'corpus_data': []}, 'corpus_data: is empty', call='synthesize'),
    Row(
        'synthesis-query-without-text',
        'sdk',
        {'query_data': [{'chunks': [{'text': 'q'}, {'text': 'd'}]}]},
        'query_data[0]: has no text (chunks)',
        call='synthesize',
    ),
    Row(
        'synthesis-not-a-cross-encoder',
        'sdk',
        {'models': {'relation_miner': TINY_TIMM, 'cross_encoder': '{embedding-model}'}},
        'is not a cross-encoder: its config.json declares BertModel, not a *ForSequenceClassification',
        call='synthesize',
    ),
    Row(
        'synthesis-more-relations-than-documents',
        'sdk',
        {'num_relations': 5},
        'num_relations: 5 relations per query, but corpus_data holds 2 distinct documents',
        call='synthesize',
    ),
    Row('mining-empty-pairs', 'sdk', {'pairs': []}, 'pairs: is empty', call='mine_hard_negatives'),
    Row(
        'mining-items-not-pairs',
        'sdk',
        {'pairs': ['a doc']},
        'pairs[0]: has no chunks (a single item); mining takes (query, document) pairs',
        call='mine_hard_negatives',
    ),
    Row(
        'mining-window',
        'sdk',
        {'num_negatives': 3, 'range_min': 2, 'range_max': 4},
        'num_negatives: num_negatives 3 do not fit between range_min 2 and range_max 4',
        call='mine_hard_negatives',
    ),
    Row('local-csv-one-column', 'sdk', {'train_data': 'file:one.csv'}, 'CSV row 1 has 1 columns; expected 2'),
    Row('local-csv-bad-score', 'sdk', {'train_data': 'file:score.csv'}, "third column 'high' is not a number"),
    Row('local-jsonl-bad-record', 'sdk', {'train_data': 'file:bad.jsonl'}, 'bad.jsonl:1:'),
    # --- data as users hand it (issues 15 and 23): checked in the SDK before anything is uploaded ---------
    Row('image-file-empty', 'sdk', {'train_data': 'file:empty-image'}, "dogs/b.png': the image is empty (0 bytes)"),
    Row('image-file-truncated', 'sdk', {'train_data': 'file:cut-image'}, "dogs/b.png': a PNG cut short: its 'IDAT'"),
    Row('texts-all-empty', 'sdk', {'train_data': ['', '  ']}, 'train_data: all 2 texts are empty (or only spaces)'),
    Row(
        'tensor-layout-ambiguous',
        'sdk',
        {'train_data': [{'tensor': _ambiguous_tensor(), 'label': 'a'}]},
        'train_data[0]: tensor: a tensor of shape (3, 32, 4) could be channels first or channels last; accepted',
    ),
    # --- data files and models: only the trainer reads them ------------------------------------------
    Row('empty-file', 'trainer', {'data.jsonl': b''}, "trainData: 'file://"),
    Row(
        'malformed-json-line', 'trainer', {'data.jsonl': TEXTS + b'{not json\n'}, 'trainData: line 5 is not valid JSON'
    ),
    Row(
        'record-without-content',
        'trainer',
        {'data.jsonl': _jsonl({'label': 'a'})},
        'trainData[0]: is not a valid record',
    ),
    Row(
        'missing-labels',
        'trainer',
        {'data.jsonl': _jsonl({'text': 'a'}, {'text': 'b'})},
        '2 of 2 records have no label',
    ),
    Row(
        'mixed-items-and-pairs',
        'trainer',
        {'data.jsonl': _jsonl({'text': 'a', 'label': 'x'}, {'chunks': [{'text': 'q'}, {'text': 'd'}]})},
        'mixed data',
    ),
    Row(
        'chunk-counts-differ',
        'trainer',
        {
            'data.jsonl': _jsonl(
                {'chunks': [{'text': 'q'}, {'text': 'd'}]}, {'chunks': [{'text': 'q'}, {'text': 'd'}, {'text': 'e'}]}
            )
        },
        'trainData[1]: has 3 chunks and trainData[0] has 2; a pair has exactly two',
    ),
    Row(
        'tuple-scores-partial',
        'trainer',
        {'data.jsonl': _jsonl({'chunks': [{'text': 'q'}, {'text': 'd', 'score': 1.0}, {'text': 'e'}]})},
        'trainData[0]: scores 1 of its 2 documents',
        spec={'loss': 'MarginMSELoss'},
    ),
    Row(
        'st-columns-scores-length',
        'trainer',
        {'data.jsonl': _jsonl({'anchor': 'q', 'positive': 'd', 'negative': 'e', 'scores': [0.5]})},
        "trainData[0]: 'scores' has 1 values for 2 documents",
    ),
    Row(
        'csv-wrong-column-count', 'trainer', {'data.csv': b'a,b,c,d\ne,f\n'}, 'CSV row 2 has 2 columns and row 1 has 4'
    ),
    Row(
        'csv-score-not-a-number',
        'trainer',
        {'data.csv': b'a question,a document,high\n'},
        "the third column 'high' is not a number",
    ),
    Row('csv-header-only', 'trainer', {'data.csv': b'text,label\n'}, 'holds no records'),
    Row(
        'csv-wrong-encoding',
        'trainer',
        {'data.csv': 'café,x\nthé,y\n'.encode('latin-1')},
        'csvOptions.encoding: the CSV',
    ),
    Row('jsonl-wrong-encoding', 'trainer', {'data.jsonl': TEXTS.decode().encode('utf-16')}, 'is not UTF-8 text'),
    Row('corrupt-image', 'trainer', {'data.jsonl': _jsonl(_blob(b'not an image', 'a'))}, 'is corrupt or not an image'),
    Row('truncated-image', 'trainer', {'data.jsonl': _jsonl(_blob(png_bytes((9, 9, 9))[:60], 'a'))}, 'is corrupt'),
    Row(
        'decompression-bomb',
        'trainer',
        {'data.jsonl': _jsonl(_blob(_png_header(30000, 30000), 'a'))},
        'is too large to decode safely (Image size (900000000 pixels)',
    ),
    Row(
        'missing-image-file', 'trainer', {'data.jsonl': _jsonl({'uri': 'nope.png', 'label': 'a'})}, 'cannot read image'
    ),
    Row(
        'image-path-traversal',
        'trainer',
        {'data.jsonl': _jsonl({'uri': '../../etc/passwd.png', 'label': 'a'})},
        'climbs out of the run\'s prefix with ".."',
    ),
    Row(
        'loss-does-not-fit-data',
        'trainer',
        {'data.jsonl': TEXTS},
        'loss: MultipleNegativesRankingLoss trains on',
        spec={'loss': 'MultipleNegativesRankingLoss'},
    ),
    Row(
        'miner-with-pair-loss',
        'trainer',
        {'data.jsonl': PAIRS},
        'miner: TripletMarginMiner mines tuples for pytorch-metric-learning losses',
        spec={'loss': 'MultipleNegativesRankingLoss', 'miner': 'TripletMarginMiner'},
    ),
    Row(
        'single-class',
        'trainer',
        {'data.jsonl': _jsonl(_blob(png_bytes((200, 0, 0)), 'x'), _blob(png_bytes((0, 0, 200)), 'x'))},
        "all items have the same label 'x'; SupConLoss needs at least 2 classes",
    ),
    Row('model-cannot-embed-data', 'trainer', {'data.jsonl': TEXTS}, 'model: timm:test_resnet', spec={}),
    Row(
        'unknown-timm-model',
        'trainer',
        {'data.jsonl': GOOD_IMAGES},
        'is not a timm model',
        spec={'model': 'timm:no_such_net'},
    ),
    Row(
        'model-folder-without-config',
        'trainer',
        {'data.jsonl': GOOD_IMAGES},
        'holds no config.json',
        spec={'model': '{folder}'},
    ),
    Row(
        'hard-negatives-on-labelled-data',
        'trainer',
        {'data.jsonl': TEXTS},
        'hardNegatives: mining needs query-document pairs, but trainData holds labelled',
        spec={'hardNegatives': {'numNegatives': 1}},
    ),
    Row(
        'synthesis-corpus-empty',
        'trainer',
        {'data.jsonl': _jsonl({'text': 'a question'}), 'corpus.jsonl': b''},
        'synthesis.corpusData: ',
        spec={'task': 'synthesis', 'synthesis': {'corpusData': '{data}/corpus.jsonl', 'crossEncoder': 'ce'}},
    ),
    Row(
        'synthesis-query-is-an-image',
        'trainer',
        {'data.jsonl': GOOD_IMAGES, 'corpus.jsonl': _jsonl({'text': 'a document'})},
        'trainData: record 1 has no text (image): synthesis reads texts',
        spec={'task': 'synthesis', 'synthesis': {'corpusData': '{data}/corpus.jsonl', 'crossEncoder': 'ce'}},
    ),
    Row(
        'synthesis-relations-beyond-corpus',
        'trainer',
        {'data.jsonl': _jsonl({'text': 'a question'}), 'corpus.jsonl': _jsonl({'text': 'a'}, {'text': 'b'})},
        'synthesis.numRelations: 3 relations per query, but the corpus holds 2 distinct documents',
        spec={'task': 'synthesis', 'synthesis': {'corpusData': '{data}/corpus.jsonl', 'crossEncoder': 'ce'}},
    ),
    Row(
        'synthesis-folder-not-a-cross-encoder',
        'trainer',
        {'data.jsonl': _jsonl({'text': 'a question'}), 'corpus.jsonl': _jsonl({'text': 'a'}, {'text': 'b'})},
        "synthesis.crossEncoder: '",
        spec={
            'task': 'synthesis',
            'synthesis': {'corpusData': '{data}/corpus.jsonl', 'crossEncoder': '{folder}', 'numRelations': 1},
        },
    ),
    Row(
        'texts-all-empty-in-a-file',
        'trainer',
        {'data.jsonl': _jsonl({'text': '', 'label': 'a'}, {'text': '\t', 'label': 'b'})},
        'trainData: all 2 texts are empty',
    ),
    Row(
        'tensor-layout-ambiguous-in-a-file',
        'trainer',
        {'data.jsonl': _jsonl({'tensor': _ambiguous_tensor(), 'label': 'a'})},
        'trainData[0]: tensor: a tensor of shape (3, 32, 4) could be channels first or channels last',
    ),
    Row(
        'pairs-batch-of-two-for-a-label-loss',
        'trainer',
        {'data.jsonl': IMAGE_PAIRS},
        'batchSize: a batch of 2 holds one pair: TripletMarginLoss sees each query and its document as a class',
        spec={'batchSize': 2, 'loss': 'TripletMarginLoss'},  # a label loss on pairs (not the pairs recipe)
    ),
    Row(
        'pairs-batch-of-one',
        'trainer',
        {'data.jsonl': IMAGE_PAIRS},
        'batchSize: a batch of 1 pair has nothing to compare it with: MultipleNegativesRankingLoss needs at least 2',
        spec={'batchSize': 1, 'loss': 'MultipleNegativesRankingLoss'},
    ),
    Row(
        'freeze-without-output-dim',
        'trainer',
        {'data.jsonl': GOOD_IMAGES},
        'freeze: freeze: true trains only',
        spec={'freeze': True},
    ),
]


def rows(layer: str) -> list[Any]:
    return [pytest.param(row, id=row.id) for row in ROWS if row.layer == layer]


def test_the_catalogue_has_forty_distinct_rows_across_all_layers() -> None:
    assert len(ROWS) >= 40
    assert len({row.id for row in ROWS}) == len(ROWS), 'row ids are unique'
    assert len({row.expected for row in ROWS}) == len(ROWS), 'every row expects its own message'
    assert {row.layer for row in ROWS} == {'contract', 'operator', 'sdk', 'trainer'}


# --- contract and operator: a CR applied by hand --------------------------------------------------


def _crd_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / 'crds' / 'finetuneruns.finetuner.dev.yaml').read_text())
    return crd['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']['spec']


def _spec(patch: dict[str, Any]) -> dict[str, Any]:
    spec = {**BASE_SPEC, **patch}
    return {k: v for k, v in spec.items() if v is not None}


def _reconcile(name: str, spec: dict[str, Any]) -> tuple[FakeKube, dict[str, Any]]:
    fake = FakeKube()
    body = fake.add('FinetuneRun', {'metadata': {'name': name, 'namespace': 'default'}, 'spec': spec})
    config = OperatorConfig(output='s3://b/runs')
    reconciler = Reconciler(fake, config, now=lambda: NOW, reports=Reports())  # type: ignore[arg-type]
    reconciler.reconcile_run(body)
    reconciler.reconcile_run(fake.get_run('default', name))  # a second pass changes nothing
    return fake, fake.get_run('default', name)


@pytest.mark.parametrize('row', rows('contract'))
def test_contract_refuses_the_cr_field(row: Row) -> None:
    spec = _spec(row.input)
    refused_by_crd = not jsonschema.Draft7Validator(_crd_spec_schema()).is_valid(spec)
    assert refused_by_crd == row.crd, f'the CRD schema {"refuses" if refused_by_crd else "accepts"} {row.id}'

    fake, body = _reconcile('bad-input', spec)

    status = body['status']
    assert (status['phase'], status['reason']) == ('FAILED', 'InvalidSpec')
    assert status['details'].startswith('Invalid spec: spec')
    assert row.expected in status['details']
    assert fake.creates == [], 'nothing is created for a refused spec'
    assert [e for e in fake.events if e[1] == 'InvalidSpec'] and len(fake.events) == 1, 'one InvalidSpec event'


@pytest.mark.parametrize('row', rows('operator'))
def test_operator_refuses_what_only_it_sees(row: Row) -> None:
    spec = _spec(row.input)
    FinetuneRunSpec.model_validate(spec)  # the contract alone accepts it

    fake, body = _reconcile(row.name, spec)

    status = body['status']
    assert (status['phase'], status['reason']) == ('FAILED', 'InvalidSpec')
    assert row.expected in status['details']
    assert fake.creates == []
    assert [e[1] for e in fake.events] == ['InvalidSpec']


# --- SDK ---------------------------------------------------------------------------------------------


LOCAL_FILES: dict[str, bytes | dict[str, bytes]] = {
    'one.csv': b'only-one-column\nanother\n',
    'score.csv': b'a query,a document,high\n',
    'bad.jsonl': b'{"label": "x"}\n',
    'empty-image': {'cats/a.png': png_bytes((200, 0, 0)), 'dogs/b.png': b''},  # a folder of class folders
    'cut-image': {'cats/a.png': png_bytes((200, 0, 0)), 'dogs/b.png': png_bytes((0, 0, 200))[:60]},
}


def _local(path: Path, content: bytes | dict[str, bytes]) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
        return
    for name, data in content.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)


@pytest.mark.parametrize('row', rows('sdk'))
def test_sdk_refuses_the_argument_before_anything_is_stored(row: Row, tmp_path: Path) -> None:
    backend = finetuner.login(backend='local', home=tmp_path / 'home')
    arguments: dict[str, Any] = {'model': TINY_TIMM, 'train_data': ['a doc', 'another doc'], **row.input}
    data = arguments.get('train_data')
    if isinstance(data, str) and data.startswith('file:') and not data.startswith('file://'):
        local = tmp_path / data.removeprefix('file:')
        _local(local, LOCAL_FILES[local.name])
        arguments['train_data'] = str(local)

    with pytest.raises(ArgumentError) as caught:
        _call_sdk(row, arguments, tmp_path)

    assert row.expected in str(caught.value)
    assert backend.list_runs() == []
    assert not (tmp_path / 'home' / 'datasets').exists(), 'nothing uploaded'


def _call_sdk(row: Row, arguments: dict[str, Any], tmp_path: Path) -> Any:
    """The row's SDK function with its arguments (fit's are the base; the others get their own base)."""
    if row.call == 'fit':
        return finetuner.fit(**arguments)
    embedding_model = tmp_path / 'embedding-model'
    embedding_model.mkdir()
    (embedding_model / 'config.json').write_text(json.dumps({'architectures': ['BertModel'], 'model_type': 'bert'}))
    given = {k: str(embedding_model) if v == '{embedding-model}' else v for k, v in row.input.items()}
    if isinstance(given.get('models'), dict):
        given['models'] = {
            k: str(embedding_model) if v == '{embedding-model}' else v for k, v in given['models'].items()
        }
    if row.call == 'synthesize':
        base = {'query_data': ['a question'], 'corpus_data': ['a', 'b'], 'num_relations': 1}
        models = {'relation_miner': TINY_TIMM, 'cross_encoder': 'cross-encoder/ms-marco-MiniLM-L6-v2'}
        return finetuner.synthesize(**{**base, 'models': models, **given})
    pairs = [{'chunks': [{'text': 'q'}, {'text': 'd'}]}, {'chunks': [{'text': 'r'}, {'text': 'e'}]}]
    return finetuner.mine_hard_negatives(**{'pairs': pairs, 'model': TINY_TIMM, 'show_progress': False, **given})


def test_sdk_validates_run_names_before_any_backend_call() -> None:
    with pytest.raises(ArgumentError, match="run_name: 'Bad_Name' is not a valid name"):
        finetuner.get_run('Bad_Name')
    with pytest.raises(ArgumentError, match=r"name: '\.\./x' is not a valid name"):
        finetuner.push_data('../x', ['a doc'])


# --- the local backend: one name, two processes; a run folder deleted by hand ----------------------

RACE_WORKER = """
import json, sys, time
from pathlib import Path
import finetuner, finetuner.backends
from finetuner.backends.local import LocalBackend
me, folder, scripted, rounds = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
finetuner.backends.use(LocalBackend(command=[sys.executable, scripted]))
size = {'a': 3, 'b': 5}[me]
for i in range(rounds):
    docs = [f'{me}-data round {i} item {j}' for j in range(size)]
    (folder / f'ready-{i}-{me}').touch()
    while not (folder / f'go-{i}').exists():
        time.sleep(0.0005)
    try:
        finetuner.fit(model='scripted:ok', train_data=docs, run_name=f'race-{i}')
        outcome = 'won'
    except finetuner.ArgumentError as e:
        outcome = str(e)
    (folder / f'result-{i}-{me}.part').write_text(outcome)
    (folder / f'result-{i}-{me}.part').rename(folder / f'result-{i}-{me}')  # seen only once whole
"""


def test_two_processes_fitting_one_run_name_at_once_never_mix_their_data(tmp_path: Path) -> None:
    """20 times, two processes call fit() with the same run_name at the same moment, each with its own
    data: one wins, the other is told the name is taken, and the winner's run trains on the winner's data
    (the name is reserved before anything is uploaded, and uploads go to names of that submission alone)."""
    from tests.sdk.conftest import SCRIPTED_TRAINER
    from tests.sdk.queue_support import wait_until

    home, rounds = tmp_path / 'home', 20
    backend = finetuner.login(backend='local', home=home, cpu_runs=4)
    env = {**os.environ, 'FINETUNER_HOME': str(home), 'PYTHONPATH': os.pathsep.join([str(ROOT), *sys.path])}
    workers = [
        subprocess.Popen(
            [sys.executable, '-c', RACE_WORKER, me, str(tmp_path), str(SCRIPTED_TRAINER), str(rounds)], env=env
        )
        for me in ('a', 'b')
    ]
    winners = []
    try:
        for i in range(rounds):
            wait_until(lambda i=i: all((tmp_path / f'ready-{i}-{me}').exists() for me in 'ab'), what=f'round {i}')
            (tmp_path / f'go-{i}').touch()
            wait_until(lambda i=i: all((tmp_path / f'result-{i}-{me}').exists() for me in 'ab'), what=f'results {i}')
            outcomes = {me: (tmp_path / f'result-{i}-{me}').read_text() for me in 'ab'}
            won = [me for me, outcome in outcomes.items() if outcome == 'won']
            assert len(won) == 1, outcomes
            (lost,) = set('ab') - set(won)
            assert (
                outcomes[lost]
                == f"run_name: a run named 'race-{i}' already exists; choose another name or delete_run('race-{i}')"
            )
            winners.append(won[0])
        assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    finally:
        for worker in workers:  # a failed round leaves the other worker waiting for its go
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    for i, winner in enumerate(winners):
        run = finetuner.get_run(f'race-{i}')
        assert run.wait(timeout=120, poll=0.1)['status'] == 'FINISHED', run.logs()
        log = run.logs()
        assert f'read {3 if winner == "a" else 5} records' in log, (winner, log)
        assert f'first record: {{"text": "{winner}-data round {i} item 0"}}' in log, (winner, log)
    uploaded = sorted(p.name for p in (home / 'datasets').iterdir())
    assert len(uploaded) == rounds, 'no upload of a losing submission is left behind'
    assert all(name.startswith('race-') and name.endswith('-train') for name in uploaded)
    assert len(backend.list_runs()) == rounds


def test_a_run_whose_folder_is_deleted_while_it_trains_frees_its_name(tmp_path: Path) -> None:
    """The trainer is stopped at once (it would re-create the folder), what is left (the re-created
    folder, the run's uploaded datasets, its claim on the name) is deleted, and the name is free again;
    delete_run cleans up after a folder deleted when nothing watched it any more."""
    from finetuner.backends.local import LocalBackend, process_alive
    from finetuner.errors import RunNotFoundError
    from tests.sdk.conftest import SCRIPTED_TRAINER
    from tests.sdk.queue_support import wait_until

    home = tmp_path / 'home'
    backend = LocalBackend(home=home, command=[sys.executable, str(SCRIPTED_TRAINER)])
    finetuner.backends.use(backend)
    run = finetuner.fit(model='scripted:slow', train_data=['red cat', 'blue dog'], run_name='doomed')
    finetuner.fit(model='scripted:ok', train_data=['green fish'], run_name='queued-then-deleted')
    wait_until(lambda: run.status()['status'] == 'STARTED', what='training')
    trainer = json.loads((backend.run_dir('doomed') / 'state.json').read_text())['trainer_pid']
    assert len(list((home / 'datasets').iterdir())) == 2

    shutil.rmtree(backend.run_dir('doomed'))  # by hand, while it trains
    shutil.rmtree(backend.run_dir('queued-then-deleted'))  # and one still waiting in line

    wait_until(lambda: not process_alive(trainer), timeout=15, what='the trainer stopped')
    wait_until(lambda: not backend.run_dir('doomed').exists(), timeout=15, what='the re-created folder removed')
    with pytest.raises(RunNotFoundError, match="run 'doomed' not found"):
        finetuner.get_run('doomed')
    assert [r.name for r in finetuner.list_runs()] == []
    assert not list((home / 'datasets').iterdir()), 'the uploads of both runs are deleted'
    assert not list((home / 'claims').iterdir()) and not list((home / 'queue' / 'tickets').iterdir())
    again = finetuner.fit(model='scripted:ok', train_data=['a new start'], run_name='doomed')
    assert again.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert 'first record: {"text": "a new start"}' in again.logs()

    shutil.rmtree(backend.run_dir('doomed'))  # deleted by hand after it ended: nothing watches it now
    assert len(list((home / 'datasets').iterdir())) == 1
    finetuner.delete_run('doomed')  # cleans what is left: its uploaded datasets and its claim
    assert not list((home / 'datasets').iterdir()) and not (home / 'claims' / 'doomed.json').exists()
    with pytest.raises(RunNotFoundError, match="run 'doomed' not found"):
        finetuner.delete_run('doomed')


# --- the local backend: what save_model does to your folders; what a failed run tells you --------------


@pytest.fixture
def scripted() -> LocalBackend:
    """The local backend running the scripted trainer (tests/sdk/scripted_trainer.py): finished runs, fast."""
    from tests.sdk.conftest import SCRIPTED_TRAINER

    backend = LocalBackend(command=[sys.executable, str(SCRIPTED_TRAINER)])
    finetuner.backends.use(backend)  # undone after each test (tests/reliability/conftest.py)
    return backend


def _finished(run_name: str) -> finetuner.Run:
    run = finetuner.fit(model='scripted:ok', train_data=labelled_texts(2, 3), run_name=run_name)
    assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED', run.logs()
    return run


def test_save_model_never_mixes_into_a_folder_that_holds_something(scripted: LocalBackend, tmp_path: Path) -> None:
    """A non-empty target is refused unless overwrite=True, and then replaced whole; a file is refused."""
    run = _finished('to-save')
    target = tmp_path / 'model'
    target.mkdir()
    (target / 'config.json').write_text('{"mine": true}')
    with pytest.raises(ArgumentError) as caught:
        run.save_model(target)
    assert str(caught.value) == (
        f'path: folder {str(target)!r} is not empty (1 entries: config.json); give a new or empty folder, '
        'or save_model(path, overwrite=True) to replace it and everything in it'
    )
    assert (target / 'config.json').read_text() == '{"mine": true}', 'the user file is untouched'

    assert run.save_model(target, overwrite=True) == str(target)
    assert sorted(p.name for p in target.iterdir()) == ['manifest.json', 'weights.json'], 'replaced, not mixed'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.model.')], 'no staging folder left'

    empty = tmp_path / 'empty'
    empty.mkdir()
    assert run.save_model(empty) == str(empty)  # an empty folder is fine
    assert run.save_model(tmp_path / 'new' / 'deep') == str(tmp_path / 'new' / 'deep')

    a_file = tmp_path / 'model.bin'
    a_file.write_bytes(b'x')
    for overwrite in (False, True):
        with pytest.raises(ArgumentError) as caught:
            run.save_model(a_file, overwrite=overwrite)
        assert (
            str(caught.value) == f'path: {str(a_file)!r} is a file; give a folder (new or empty) to save the model in'
        )
    assert a_file.read_bytes() == b'x'


def test_save_model_that_fails_half_way_leaves_the_folder_as_it_was(
    scripted: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetuner.storage import StorageError

    run = _finished('half-way')
    target = tmp_path / 'model'
    run.save_model(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    store_type = type(scripted.output_store('half-way'))

    def broken(self: object, key: str, directory: Path) -> list[str]:
        (Path(directory) / 'weights.json').write_text('partial')
        raise StorageError('the connection dropped')

    monkeypatch.setattr(store_type, 'download_dir', broken)
    with pytest.raises(finetuner.BackendError, match=r"cannot download the model of run 'half-way': the connection"):
        run.save_model(target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']


LABELLED = [{'text': text, 'label': text.split()[-1]} for text in ('a red cat', 'a grey cat', 'a big dog', 'a dog')]


@pytest.mark.parametrize(
    ('model_options', 'advice', 'not_advised'),
    [
        pytest.param(
            {'pretrained': False},
            "model_options={'pretrained': False} skips only the weights: the configuration and tokenizer of "
            "'bert-base-cased' still come from the hub, and they are not on this machine and cannot be downloaded",
            'train from scratch',  # what was asked already
            id='pretrained-false',
        ),
        pytest.param(
            {},
            "the pretrained weights of 'bert-base-cased' are not on this machine and cannot be downloaded",
            'config.json and tokenizer files',
            id='pretrained',
        ),
    ],
)
def test_a_model_this_machine_cannot_fetch_gets_advice_that_fits_what_was_asked(
    model_options: dict[str, Any], advice: str, not_advised: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real trainer, offline, with an empty Hugging Face cache: bert-base-cased cannot be fetched."""
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    finetuner.backends.use(None)  # the local backend with the real trainer
    run = finetuner.fit(model='bert-base-cased', model_options=model_options, train_data=LABELLED, cpu=True)

    final = run.wait(timeout=240, poll=0.2)

    assert final['status'] == 'FAILED' and run.full_status().reason == 'WeightsUnavailable'
    assert final['details'].startswith(advice), final['details']
    assert 'HF_ENDPOINT to a reachable hub mirror' in final['details']
    assert not_advised not in final['details']


@pytest.mark.parametrize(
    ('arguments', 'expected'),
    [
        pytest.param(
            {'train_data': [_image_pair(seed) for seed in range(4)], 'batch_size': 1},
            'batch_size: a batch of 1 pair has nothing to compare it with: MultipleNegativesRankingLoss needs at '
            'least 2',
            id='batch-size',
        ),
        pytest.param(
            {'train_data': [*(r.model_dump(exclude_defaults=True) for r in labelled_images(2, 2)), _blob(b'x', 'a')]},
            "train_data[4]: image 'blob' is corrupt or not an image",
            id='record-index',
        ),
    ],
)
def test_a_trainer_error_names_the_argument_as_fit_was_called(arguments: dict[str, Any], expected: str) -> None:
    """The trainer names spec.batchSize and spec.trainData[4] (the trainer rows above, and the cluster test
    below); whoever called fit() reads batch_size and train_data[4], records counted from 0 on both sides."""
    finetuner.backends.use(None)  # the local backend with the real trainer
    loss = {'loss': 'MultipleNegativesRankingLoss'} if 'batch_size' in arguments else {}
    run = finetuner.fit(model=TINY_TIMM, model_options=TINY_TIMM_OPTIONS, cpu=True, num_workers=0, **loss, **arguments)

    final = run.wait(timeout=240, poll=0.2)

    assert final['status'] == 'FAILED' and run.full_status().reason == 'ConfigurationError'
    assert final['details'].startswith(expected), final['details']
    assert 'spec.' not in final['details'] and 'batchSize' not in final['details']


# --- data read as the user meant it (issue 23: "silently wrong"): the behaviour, asserted -------------


@contextlib.contextmanager
def _trainer_log() -> Iterator[list[str]]:
    """The trainer's data log lines (its logger may not propagate once a run's logging was set up)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger('finetuner_trainer.data')
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the decisions (a header, a delimiter) are logged at INFO
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _read_both(tmp_path: Path, content: bytes, **options: Any) -> list[Record]:
    """The CSV as the SDK reads a local file and as the trainer reads one from a store: the same records."""
    from finetuner.api.v1alpha1 import CSVOptions
    from finetuner.data import read_csv
    from finetuner_trainer.data import parse_csv

    path = tmp_path / 'data.csv'
    path.write_bytes(content)
    sdk = read_csv(path, 'train_data', CSVOptions(**options))
    trainer = parse_csv(content, CSVOptions(**options), 'trainData')

    def read(record: Record) -> tuple[Any, ...]:  # the SDK names the chunks' modalities, the trainer not yet
        return record.text, record.label, record.score, [chunk.text for chunk in record.chunks]

    assert [read(r) for r in sdk] == [read(r) for r in trainer]
    return sdk


def csv_utf8_bom(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8": the byte-order mark is not part of the header, nor of a first text."""
    content = 'text,label\nred apple,fruit\ncarrot,vegetable\npear,fruit\n'.encode('utf-8-sig')
    records = _read_both(tmp_path, content, is_labeled=True)
    assert [(r.text, r.label) for r in records] == [('red apple', 'fruit'), ('carrot', 'vegetable'), ('pear', 'fruit')]
    headerless = '\ufeffred apple,fruit\ncarrot,vegetable\n'.encode()
    assert _read_both(tmp_path, headerless, is_labeled=True)[0].text == 'red apple'


def jsonl_utf8_bom(tmp_path: Path) -> None:
    """A JSONL file saved with a byte-order mark reads as the same records in the SDK and the trainer."""
    from finetuner.data import read_jsonl
    from finetuner_trainer.data import parse_jsonl

    content = '\ufeff'.encode() + TEXTS
    path = tmp_path / 'data.jsonl'
    path.write_bytes(content)
    expected = [(f'item {i}', f'c{i % 2}') for i in range(4)]
    assert [(r.text, r.label) for r in read_jsonl(path, 'train_data')] == expected
    assert [(r.text, r.label) for r in parse_jsonl(content, 'trainData')] == expected


def csv_header_of_other_names(tmp_path: Path) -> None:
    """A header such as title,category or question,answer is detected and skipped, and the log says which was
    decided and why; the option overrides."""
    content = b'title,category\nA day at the beach,travel\nBaking bread,cooking\nParis,travel\n'
    with _trainer_log() as log:
        records = _read_both(tmp_path, content, is_labeled=True)
    assert [r.text for r in records] == ['A day at the beach', 'Baking bread', 'Paris']
    assert (
        "trainData: CSV: the first row ['title', 'category'] is read as a header and skipped (its cells are column "
        'names; set csvOptions.header to false to read it as data)'
    ) in log
    with _trainer_log() as log:
        assert _read_both(tmp_path, content, is_labeled=True, header=False)[0].text == 'title'
    assert "trainData: CSV: the first row ['title', 'category'] is read as data (csvOptions.header is false)" in log
    pairs = b'question,answer\nWhat is AI?,A field of computing.\nWho are you?,A bot.\n'
    assert [r.chunks[0].text for r in _read_both(tmp_path, pairs)] == ['What is AI?', 'Who are you?']


def csv_semicolons_with_commas(tmp_path: Path) -> None:
    """A ;-separated file whose texts hold commas is split at ';' (and a delimiter option can say so); a quote
    character option reads cells that hold the delimiter."""
    content = b'text;label\nI love pizza, really;food\nCarrots, peas;vegetable\nBeans, rice;food\n'
    records = _read_both(tmp_path, content, is_labeled=True)
    assert (records[0].text, records[0].label, len(records)) == ('I love pizza, really', 'food', 3)
    assert {r.label for r in _read_both(tmp_path, content, is_labeled=True, delimiter=';')} == {'food', 'vegetable'}
    quoted = b'text;label\n|I love pizza; really|;food\n|Carrots; peas|;vegetable\nBeans;food\n'  # quotechar |
    records = _read_both(tmp_path, quoted, is_labeled=True, delimiter=';', quotechar='|')
    assert [(r.text, r.label) for r in records] == [
        ('I love pizza; really', 'food'),
        ('Carrots; peas', 'vegetable'),
        ('Beans', 'food'),
    ]


def png_16_bit(tmp_path: Path) -> None:
    """A 16-bit PNG reads as its 8-bit image (pixel statistics), where Pillow's convert('RGB') gives white."""
    import numpy as np
    from PIL import Image

    from finetuner_trainer.images import decode_image
    from tests.trainer.test_image_forms import png16, reference

    grey = np.asarray(Image.fromarray(reference()).convert('L'))
    data = png16(grey.astype(np.uint16) * 257)
    with Image.open(io.BytesIO(data)) as image:
        assert np.asarray(image.convert('RGB')).mean() > 250
    ours = np.asarray(decode_image(data)).astype(float)
    assert abs(ours.mean() - grey.mean()) < 0.5 and abs(ours.std() - grey.std()) < 0.5


def image_modes(tmp_path: Path) -> None:
    """I, F, CMYK, P with transparency and LA read as Pillow's reference conversions (pixel statistics)."""
    import numpy as np
    from PIL import Image

    from finetuner_trainer.images import decode_image
    from tests.trainer.test_image_forms import encoded, reference

    rgb = reference(7)
    grey = np.asarray(Image.fromarray(rgb).convert('L'))
    palette = Image.fromarray(rgb).quantize(colors=32)
    palette.info['transparency'] = 0
    cases = {
        'I': (Image.fromarray(grey.astype(np.int32) * 257), 'TIFF', np.stack([grey] * 3, axis=-1)),
        'F': (Image.fromarray(grey.astype(np.float32) / 255), 'TIFF', np.stack([grey] * 3, axis=-1)),
        'CMYK': (Image.fromarray(rgb).convert('CMYK'), 'TIFF', rgb),
        'P': (palette, 'PNG', np.asarray(palette.convert('RGBA').convert('RGB'))),
        'LA': (
            Image.fromarray(rgb).convert('LA'),
            'PNG',
            np.asarray(Image.fromarray(rgb).convert('LA').convert('RGB')),
        ),
    }
    for mode, (image, fmt, expected) in cases.items():
        ours = np.asarray(decode_image(encoded(image, fmt))).astype(float)
        assert ours.shape == expected.shape, mode
        assert np.allclose(ours.mean(axis=(0, 1)), expected.mean(axis=(0, 1)), atol=0.5), mode
        assert np.allclose(ours.std(axis=(0, 1)), expected.std(axis=(0, 1)), atol=0.5), mode


def nested_class_folders(tmp_path: Path) -> None:
    """birds/2023/summer/*.png belongs to the class birds (read recursively); no class is dropped."""
    from finetuner.data import resolve

    for name in ('birds/2023/summer/a.png', 'birds/2024/b.png', 'cats/c.png'):
        (tmp_path / 'images' / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'images' / name).write_bytes(png_bytes((10, 20, 30)))
    records = resolve(tmp_path / 'images', 'train_data').records or []
    assert sorted(str(r.label) for r in records) == ['birds', 'birds', 'cats']


def class_folder_without_images(tmp_path: Path) -> None:
    """A class folder that holds no image is named in a DataWarning: the class is not dropped silently."""
    from finetuner.data import DataWarning, resolve

    for name in ('cats/a.png', 'dogs/b.png'):
        (tmp_path / 'images' / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'images' / name).write_bytes(png_bytes((10, 20, 30)))
    (tmp_path / 'images' / 'fish').mkdir()
    with pytest.warns(DataWarning, match="class folder .*fish' holds no images .* class 'fish' is left out"):
        resolve(tmp_path / 'images', 'train_data')


def labels_read_as_pairs(tmp_path: Path) -> None:
    """text,label without is_labeled: a warning in the SDK and in the trainer's log; still read as pairs."""
    from finetuner.data import DataWarning

    content = ''.join(f'sentence {i} about food,{"fruit" if i % 2 else "vegetable"}\n' for i in range(8)).encode()
    expected = "the second column holds 2 distinct short values over 8 rows ('vegetable', 'fruit'), like class labels"
    with pytest.warns(DataWarning, match='csv_options.is_labeled is false') as warned, _trainer_log() as log:
        records = _read_both(tmp_path, content)
    assert records[0].chunks and any(expected in str(w.message) for w in warned)
    assert any(expected in line and 'csvOptions.isLabeled is false' in line for line in log)


def mostly_empty_texts(tmp_path: Path) -> None:
    """Most texts empty: a DataWarning in the SDK, a warning in the trainer's log (all empty is refused)."""
    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner.data import DataWarning, resolve
    from finetuner_trainer.data import to_dataset

    records = [Record(text='' if i % 4 else f'text {i}', label=f'c{i % 2}') for i in range(8)]
    with pytest.warns(DataWarning, match='train_data: 6 of 8 texts are empty'):
        resolve(records, 'train_data')
    with _trainer_log() as log:
        to_dataset(records, FinetuneRunSpec(model='m', train_data='file:///d.jsonl'), 'trainData')
    assert any('trainData: 6 of 8 texts are empty' in line for line in log)


BEHAVIOURS: list[Callable[[Path], None]] = [
    csv_utf8_bom,
    jsonl_utf8_bom,
    csv_header_of_other_names,
    csv_semicolons_with_commas,
    png_16_bit,
    image_modes,
    nested_class_folders,
    class_folder_without_images,
    labels_read_as_pairs,
    mostly_empty_texts,
]


@pytest.mark.parametrize('behaviour', [pytest.param(b, id=b.__name__.replace('_', '-')) for b in BEHAVIOURS])
def test_data_is_read_as_the_user_meant_it(behaviour: Callable[[Path], None], tmp_path: Path) -> None:
    """Odd-but-valid data that used to train silently wrong: each reads as meant, or says what it did."""
    behaviour(tmp_path)


# --- trainer ---------------------------------------------------------------------------------------


def _trainer_config(row: Row, tmp_path: Path) -> TrainerConfig:
    (data_name, _), *_ = row.input.items()
    (tmp_path / 'data').mkdir()
    for name, content in row.input.items():
        (tmp_path / 'data' / name).write_bytes(content)
    data = tmp_path / 'data' / data_name
    folder = tmp_path / 'empty-model'
    folder.mkdir()
    if row.id == 'synthesis-folder-not-a-cross-encoder':  # a model folder, of an embedding model
        (folder / 'config.json').write_text(json.dumps({'architectures': ['BertModel'], 'model_type': 'bert'}))

    def placed(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: placed(v) for k, v in value.items()}
        if value == '{folder}':
            return str(folder)
        return value.replace('{data}', str(tmp_path / 'data')) if isinstance(value, str) else value

    spec: dict[str, Any] = {
        'model': TINY_TIMM,
        'modelOptions': TINY_TIMM_OPTIONS,
        'trainData': data.as_uri(),
        'device': 'cpu',
        'numWorkers': 0,
        'epochs': 1,
        **{k: placed(v) for k, v in row.spec.items()},
    }
    if row.id == 'model-cannot-embed-data':
        spec['loss'] = 'TripletMarginLoss'
    return TrainerConfig(
        run_name='bad-input',
        spec=FinetuneRunSpec.model_validate(spec),
        output_uri=(tmp_path / 'out').as_uri(),
        data_uri=(tmp_path / 'datasets').as_uri(),
        termination_log=str(tmp_path / 'termination-log'),
    )


@pytest.mark.parametrize('row', rows('trainer'))
def test_trainer_exits_with_the_config_error_code_and_names_the_field(row: Row, tmp_path: Path) -> None:
    from finetuner_trainer.runner import main

    config = _trainer_config(row, tmp_path)
    path = tmp_path / 'config.json'
    path.write_text(config.model_dump_json(by_alias=True))

    code = main(['--config', str(path)])

    message = (tmp_path / 'termination-log').read_text()
    assert code == EXIT_CONFIG_ERROR, message
    assert row.expected in message
    assert message.startswith('spec.'), 'the field as the custom resource names it (the SDK rewords it for fit())'
    assert '\n' not in message.strip(), 'one line: it becomes the run status'
    failure = json.loads((tmp_path / 'out' / 'failure.json').read_text())
    assert failure['reason'] == 'ConfigError' and failure['message'] == message.strip()
    assert not (tmp_path / 'out' / 'artifact').exists()


# --- the same refusals on the test cluster: FAILED at once, never a crash loop ---------------------


def test_trainer_config_error_on_the_cluster_fails_after_one_attempt(cluster: Any, tmp_path: Path) -> None:
    from tests.e2e.targets import Target

    target = Target('simulated', cluster.api, 'default', cluster.bucket, timeout=120.0)
    target.login()
    bad = tmp_path / 'bad.jsonl'
    bad.write_bytes(_jsonl(_blob(b'not an image', 'a'), _blob(b'nor this', 'b')))
    finetuner.fit(
        model=TINY_TIMM,
        model_options=TINY_TIMM_OPTIONS,
        train_data=str(bad),
        run_name='bad-data',
        device='cpu',
        backoff_limit=3,
    )

    status = target.wait_phase('bad-data', ('FAILED', 'FINISHED'))

    assert (status['phase'], status['reason']) == ('FAILED', 'ConfigurationError')
    assert "spec.trainData[0]: image 'blob' is corrupt or not an image" in status['details']
    assert status['attempts'] == 1, 'exit code 3 is never retried (backoffLimit 3 unused)'
    assert len(target.pods('bad-data')) == 1 and len(target.jobs('bad-data')) == 1
    assert [e.reason for e in target.events('bad-data')].count('Failed') == 1


def test_operator_refusal_on_the_cluster_creates_no_child(cluster: Any) -> None:
    from kubernetes import client

    from tests.e2e.targets import Target

    name = 'r' + 'x' * 59  # a valid CR name (253), too long for '<name>-trainer' (63)
    body = {
        'apiVersion': 'finetuner.dev/v1alpha1',
        'kind': 'FinetuneRun',
        'metadata': {'name': name},
        'spec': {**BASE_SPEC, 'output': 'http://store/runs'},
    }
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        'finetuner.dev', 'v1alpha1', 'default', 'finetuneruns', body
    )
    target = Target('simulated', cluster.api, 'default', cluster.bucket, timeout=30.0)

    status = target.wait_phase(name, ('FAILED',))

    assert status['reason'] == 'InvalidSpec'
    assert f'metadata.name: {name!r} is 60 characters long; use at most 52' in status['details']
    assert "spec.output: 'http://store/runs' uses http://" in status['details']
    cluster.operator.restart()  # a restarted operator refuses it again, still without children
    assert target.wait_phase(name, ('FAILED',))['details'] == status['details']
    assert cluster.server.objects('batch/v1/jobs') == [] and cluster.server.objects('v1/configmaps') == []
    assert [e.reason for e in target.events(name)] == ['InvalidSpec']
