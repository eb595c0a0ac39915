"""The contract of training data a run makes itself: hard negatives and synthesis.

- ``hardNegatives`` (:class:`HardNegativeOptions`): before fine-tuning on (query, document) pairs, the
  trainer embeds them with the base model and adds each query's closest documents that are not its
  own as explicit negatives (sentence-transformers' ``mine_hard_negatives`` semantics: ``rangeMin``,
  ``rangeMax``, margins, score bounds, ``top`` or ``random`` sampling, an optional cross-encoder);
  ``finetuner.mine_hard_negatives`` runs the same mining on this machine and returns the data.
- ``task: synthesis`` (:class:`SynthesisOptions`): a FinetuneRun that trains nothing. Its
  ``trainData`` holds unlabelled queries, ``synthesis.corpusData`` the documents; the run's ``model``
  mines ``numRelations`` documents per query, a cross-encoder scores every (query, document) pair, and
  the run publishes the scored tuples as ``artifact/data.jsonl``: training data for ``MarginMSELoss``.
  The operator reconciles it like any run (same Job, phases, status, logs, checkpoints and resume).

Everything here is checked where it is given (``fit()``, the API server's schema, the trainer), with
messages naming the field.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from finetuner.api.layout import ARTIFACT

SYNTHESIS_DATA_FILE = 'data.jsonl'
SYNTHESIS_DATA = f'{ARTIFACT}/{SYNTHESIS_DATA_FILE}'  # under a synthesis run's outputUri: its training data
SYNTHESIS_FORMAT = 'finetuner-synthesis-data'  # artifact/manifest.json "format" of a synthesis run


class Task(str, Enum):
    FINETUNE = 'finetune'
    SYNTHESIS = 'synthesis'


class Sampling(str, Enum):
    TOP = 'top'
    RANDOM = 'random'


class OutputFormat(str, Enum):
    TRIPLET = 'triplet'
    N_TUPLE = 'n-tuple'


class SearchIndex(str, Enum):
    AUTO = 'auto'
    EXACT = 'exact'
    FAISS = 'faiss'


class _Options(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused (as the contract's models)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra='forbid', use_enum_values=True, validate_default=True
    )


# Up to this many documents ``search: auto`` ranks exactly; past it a faiss HNSW index (when faiss is installed).
# bench/mining_search.py times both at as many queries as documents, index build included (docs/MINING.md):
# on embedding-like vectors HNSW starts to pay between 50,000 and 100,000 documents (1.23x at 100,000, every
# neighbour found); on random vectors exact search is still 2.3x faster at 100,000 and HNSW finds 27%.
EXACT_LIMIT = 100_000


def _search_field() -> object:
    return Field(
        default=SearchIndex.AUTO,
        description='How the closest documents are found: exact (top-k on torch, in blocks), faiss (a faiss '
        f'HNSW index, approximate), or auto (exact up to {EXACT_LIMIT:,} documents, faiss above when it is '
        'installed).',
    )


class HardNegativeOptions(_Options):
    """Options of hard-negative mining, as sentence-transformers names them."""

    model_config = ConfigDict(
        json_schema_extra={
            'x-kubernetes-validations': [  # what the API server can judge itself (CEL), as _window does
                {
                    'rule': '!has(self.rangeMax) || self.rangeMax > (has(self.rangeMin) ? self.rangeMin : 0)',
                    'message': 'rangeMax must be larger than rangeMin',
                    'fieldPath': '.rangeMax',
                },
                {
                    'rule': '!has(self.rangeMax) || (has(self.numNegatives) ? self.numNegatives : 3) <= '
                    'self.rangeMax - (has(self.rangeMin) ? self.rangeMin : 0)',
                    'message': 'numNegatives must fit between rangeMin and rangeMax',
                    'fieldPath': '.numNegatives',
                },
            ]
        }
    )

    num_negatives: int = Field(default=3, ge=1, le=100, description='Negatives mined per (query, document) pair.')
    range_min: int = Field(
        default=0, ge=0, description='Skip this many of the closest candidates (they may be unlabelled positives).'
    )
    range_max: int | None = Field(
        default=None,
        ge=1,
        description='Consider only the rangeMax closest candidates; empty: rangeMin + numNegatives plus room for '
        'positives (10 x numNegatives when a margin or score bound filters candidates).',
    )
    absolute_margin: float | None = Field(
        default=None, description='Keep a candidate only when its score is below the positive score minus this.'
    )
    relative_margin: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description='Keep a candidate only when its score is below positive - |positive| x relativeMargin.',
    )
    max_score: float | None = Field(default=None, description='Skip candidates scoring above this.')
    min_score: float | None = Field(default=None, description='Skip candidates scoring below this.')
    sampling_strategy: Sampling = Field(
        default=Sampling.TOP,
        description='top (the closest candidates left) or random (numNegatives drawn among them).',
    )
    cross_encoder: str | None = Field(
        default=None,
        max_length=2048,
        description='A cross-encoder (Hugging Face sequence-classification model id or folder) that rescores the '
        'candidates and positives; its scores then order, filter and (outputScores) label them.',
    )
    output_format: OutputFormat = Field(
        default=OutputFormat.N_TUPLE,
        description='n-tuple (one record per pair: query, document, numNegatives negatives; pairs without enough '
        'negatives are left out) or triplet (one record per negative found).',
    )
    output_scores: bool = Field(
        default=False, description='Keep the scores of the document and the negatives (scored tuples, MarginMSELoss).'
    )
    search: SearchIndex = _search_field()
    batch_size: int = Field(default=64, ge=1, le=4096, description='Texts embedded or scored per batch.')
    seed: int = Field(default=0, ge=0, description='Seed of random sampling.')

    @model_validator(mode='after')
    def _window(self) -> HardNegativeOptions:
        if self.range_max is not None:
            if self.range_max <= self.range_min:
                raise ValueError(
                    f'rangeMax {self.range_max} must be larger than rangeMin {self.range_min}; '
                    'raise rangeMax or lower rangeMin'
                )
            if self.num_negatives > self.range_max - self.range_min:
                raise ValueError(
                    f'numNegatives {self.num_negatives} do not fit between rangeMin {self.range_min} and rangeMax '
                    f'{self.range_max}; lower numNegatives or widen the range'
                )
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f'minScore {self.min_score} is above maxScore {self.max_score}; swap them')
        return self


class SynthesisOptions(_Options):
    """What a synthesis run (``task: synthesis``) reads and how it scores."""

    corpus_data: str = Field(
        min_length=1,
        max_length=2048,
        description='The documents: an s3:// or file:// URI (JSONL, CSV or docarray binary) or a pushed dataset '
        'name; every record needs text.',
    )
    cross_encoder: str = Field(
        min_length=1,
        max_length=2048,
        description='The cross-encoder that scores (query, document) pairs: a Hugging Face sequence-classification '
        'model id, a local folder or an s3:// prefix holding one.',
    )
    num_relations: int = Field(
        default=3, ge=1, le=100, description='Documents mined (and scored) per query; at most the corpus size.'
    )
    max_length: int | None = Field(
        default=None, ge=8, le=8192, description='Tokens of a (query, document) pair the cross-encoder reads.'
    )
    batch_size: int = Field(default=64, ge=1, le=4096, description='Texts embedded or pairs scored per batch.')
    search: SearchIndex = _search_field()
