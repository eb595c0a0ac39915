"""The one typed contract: ``FinetuneRun`` and ``Experiment`` (group ``finetuner.dev``, ``v1alpha1``).

Everything else is derived from these models: the CRD YAML in ``crds/`` and the Helm chart
(``python -m finetuner.api.crdgen``), the operator's parsing of custom resources, the trainer's
configuration, and the SDK's ``fit()`` arguments. A field is added here and nowhere else.

Python attributes are snake_case; the Kubernetes wire format is camelCase (``by_alias``).
Every field carries a description: it becomes ``kubectl explain`` text.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

from finetuner.api.callback_options import CALLBACK_NAMES
from finetuner.api.mining import HardNegativeOptions, SynthesisOptions, Task
from finetuner.api.pod import POD_SETTING_FIELDS, Affinity, EnvVar, LocalObjectReference, PodSettings, Volume
from finetuner.catalog import (
    LOSS_NAMES,
    MINER_NAMES,
    OPTIMIZER_NAMES,
    SCHEDULER_NAMES,
)

GROUP = 'finetuner.dev'
VERSION = 'v1alpha1'
API_VERSION = f'{GROUP}/{VERSION}'
CATEGORY = 'finetuner'

# The trainer exits with this code on a configuration or data error. The Job's pod failure
# policy fails the Job at once on it: a user mistake is never retried.
EXIT_CONFIG_ERROR = 3

DNS1123_LABEL = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')
MAX_RUN_NAME = 52  # leaves room for the '-trainer' / '-workers' suffixes of child objects (63)
# A spec is configuration, never data: it travels in the custom resource, the ConfigMap (1 MiB) and
# every watch event. Anything bigger than this is data inlined by mistake.
MAX_SPEC_BYTES = 256 * 1024


def check_dns1123_name(value: str, field: str = 'name', max_len: int = MAX_RUN_NAME) -> str:
    """Raise ValueError naming the field unless ``value`` is a DNS-1123 label Kubernetes accepts."""
    if not isinstance(value, str) or not value:
        raise ValueError(f'{field} must be a non-empty string')
    if len(value) > max_len:
        raise ValueError(f'{field} {value!r} is {len(value)} characters long; use at most {max_len}')
    if not DNS1123_LABEL.match(value):
        raise ValueError(
            f'{field} {value!r} is not a valid name: use lower-case letters, digits and "-", '
            f'starting and ending with a letter or digit (e.g. {_suggest_name(value)!r})'
        )
    return value


def format_validation_error(error: ValidationError, prefix: str = '') -> str:
    """One line per problem, each naming the field by its wire path: ``spec.resources.gpus: ...``."""
    lines = []
    for item in error.errors():
        path = '.'.join(str(part) for part in (prefix, *item['loc']) if part != '')
        message = item['msg'].removeprefix('Value error, ')
        if item['type'] == 'extra_forbidden':
            message = 'unknown field (check the spelling; `kubectl explain finetunerun.spec` lists the fields)'
        lines.append(f'{path}: {message}' if path else message)
    return '; '.join(lines)


def _suggest_name(value: str) -> str:
    cleaned = re.sub(r'[^a-z0-9-]+', '-', value.lower()).strip('-')
    return cleaned[:MAX_RUN_NAME] or 'my-run'


class _Model(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra='forbid',
        use_enum_values=True,
        validate_default=True,
    )

    def to_k8s(self) -> dict[str, Any]:
        """The camelCase dict a Kubernetes API server stores (``None`` fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode='json')


class Phase(str, Enum):
    CREATED = 'CREATED'
    STARTED = 'STARTED'
    FINISHED = 'FINISHED'
    FAILED = 'FAILED'

    @property
    def terminal(self) -> bool:
        return self in (Phase.FINISHED, Phase.FAILED)


FreeForm = dict[str, Any]  # emitted with x-kubernetes-preserve-unknown-fields

# What the API server can check itself, published in the CRDs (crdgen copies ``json_schema_extra`` into the
# schema): patterns and bounds the contract's own validators also enforce, and CEL rules
# (``x-kubernetes-validations``) for what involves several fields. Bounded lengths keep the rules' estimated
# cost low, as Kubernetes' CEL cost estimator demands.
QUANTITY_PATTERN = r'^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$'
DNS1123_LABEL_PATTERN = DNS1123_LABEL.pattern
DNS1123_SUBDOMAIN_PATTERN = r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'
URI_LENGTH = 2048  # data, model and output locations
NAME_LENGTH = 253  # Kubernetes object names


def k8s_rule(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry: a CEL ``rule`` and the ``message`` shown when it is false."""
    entry = {'rule': rule, 'message': message}
    if field_path:
        entry['fieldPath'] = field_path
    if reason:
        entry['reason'] = reason
    return entry


# ---------------------------------------------------------------------------------------------
# FinetuneRun spec
# ---------------------------------------------------------------------------------------------


class CallbackSpec(_Model):
    name: str = Field(
        description=f'Callback class name, one of: {", ".join(CALLBACK_NAMES)}.',
        json_schema_extra={'enum': list(CALLBACK_NAMES)},
    )
    options: FreeForm = Field(
        default_factory=dict,
        description='Keyword arguments of the callback, e.g. {"monitor": "val_loss"} for '
        'BestModelCheckpoint or {"query_data": "my-eval-set"} for EvaluationCallback.',
    )

    @field_validator('name')
    @classmethod
    def _known_callback(cls, value: str) -> str:
        if value not in CALLBACK_NAMES:
            raise ValueError(f'unknown callback {value!r}; choose one of {", ".join(CALLBACK_NAMES)}')
        return value


class SchedulerStep(str, Enum):
    BATCH = 'batch'
    EPOCH = 'epoch'


class SchedulerOptions(_Model):
    num_warmup_steps: int = Field(
        default=0, ge=0, description='Steps (batches or epochs, see schedulerStep) of linear warm-up.'
    )
    scheduler_step: SchedulerStep = Field(
        default=SchedulerStep.BATCH,
        description='Whether the learning-rate scheduler steps after every batch or every epoch.',
    )
    num_cycles: float | None = Field(
        default=None, gt=0, description='Cosine schedules: number of waves (cosine_with_restarts: restarts).'
    )
    power: float | None = Field(default=None, gt=0, description='polynomial: the decay power (default 1).')
    lr_end: float | None = Field(default=None, ge=0, description='polynomial: the final learning rate.')


CSV_DIALECTS = ('auto', 'excel', 'excel-tab', 'unix')


class CSVOptions(_Model):
    size: int | None = Field(default=None, gt=0, description='Read at most this many rows.')
    sampling_rate: float | None = Field(
        default=None, gt=0, le=1, description='Keep this fraction of the rows, chosen at random.'
    )
    dialect: str = Field(
        default='auto',
        description='CSV dialect: "auto" (sniffed from the file), "excel", "excel-tab" or "unix".',
        json_schema_extra={'enum': list(CSV_DIALECTS)},
    )
    delimiter: str | None = Field(
        default=None,
        min_length=1,
        max_length=1,
        description='The character between cells, e.g. ";" or "|" ("tab" for a tab); empty: sniffed from the file.',
    )
    quotechar: str | None = Field(
        default=None,
        min_length=1,
        max_length=1,
        description='The character quoting a cell that holds the delimiter; empty: sniffed (usually ").',
    )
    header: bool | None = Field(
        default=None,
        description='true: the first row names the columns and is skipped; false: it is data; empty (or "auto"): '
        "detected (the csv module's Sniffer, or every cell a usual column name such as text, label, title, "
        'question), and the decision is logged.',
    )
    encoding: str = Field(
        default='utf-8',
        max_length=64,
        description='Text encoding of the file; a UTF-8 byte-order mark (Excel\'s "CSV UTF-8") is skipped.',
    )
    is_labeled: bool = Field(
        default=False,
        description='Two columns are (item, label) when true, (query, document) pairs when false. '
        'A third numeric column is always read as a similarity score.',
    )
    convert_to_blob: bool = Field(default=True, description='Load image paths/URIs into bytes before training.')

    @field_validator('dialect')
    @classmethod
    def _known_dialect(cls, value: str) -> str:
        if value not in CSV_DIALECTS:
            raise ValueError(f'unknown CSV dialect {value!r}; choose one of {", ".join(CSV_DIALECTS)}')
        return value

    @field_validator('delimiter', mode='before')
    @classmethod
    def _named_delimiter(cls, value: Any) -> Any:
        return '\t' if value in ('tab', '\\t') else value

    @field_validator('header', mode='before')
    @classmethod
    def _auto_header(cls, value: Any) -> Any:
        return None if value == 'auto' else value


class Device(str, Enum):
    AUTO = 'auto'
    CUDA = 'cuda'
    CPU = 'cpu'


class Sampler(str, Enum):
    AUTO = 'auto'
    CLASS = 'class'
    CLASS_OVERSAMPLE = 'class-oversample'
    RANDOM = 'random'


class OnnxQuantization(str, Enum):
    AUTO = 'auto'  # each graph as its model family plans: text dynamic, images static
    DYNAMIC = 'dynamic'
    STATIC = 'static'


class Resources(_Model):
    gpus: int = Field(default=1, ge=0, le=16, description='GPUs per node (0 trains on CPU).')
    nodes: int = Field(
        default=1, ge=1, le=64, description='Nodes (pods) of a distributed run; >1 makes an Indexed Job.'
    )
    cpu: str | None = Field(
        default=None,
        description='CPU request per pod, e.g. "8" (not a limit: idle cores help data loading); default: the '
        "operator's share per GPU.",
        json_schema_extra={'pattern': QUANTITY_PATTERN},
    )
    memory: str | None = Field(
        default=None,
        description='Memory request and limit per pod, e.g. "32Gi" (/dev/shm counts against it); default: the '
        "operator's share per GPU.",
        json_schema_extra={'pattern': QUANTITY_PATTERN},
    )
    ephemeral_storage: str | None = Field(
        default=None,
        description='Ephemeral-storage request and limit per pod, e.g. "100Gi": /tmp and $HOME, where checkpoints '
        'and the artifact are staged before upload; default: the operator setting.',
        json_schema_extra={'pattern': QUANTITY_PATTERN},
    )

    @field_validator('cpu', 'memory', 'ephemeral_storage')
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not re.match(QUANTITY_PATTERN, value):
            raise ValueError(f'{value!r} is not a Kubernetes quantity; write e.g. "4", "500m" or "16Gi"')
        return value


class Toleration(_Model):
    key: str | None = Field(default=None, description='Taint key the toleration applies to.')
    operator: Literal['Exists', 'Equal'] | None = Field(default=None, description='Exists or Equal.')
    value: str | None = Field(default=None, description='Taint value to match (operator Equal).')
    effect: Literal['NoSchedule', 'PreferNoSchedule', 'NoExecute'] | None = Field(
        default=None, description='Taint effect to match; empty matches all.'
    )
    toleration_seconds: int | None = Field(default=None, description='For NoExecute: how long to stay.')


def _pod_field(name: str) -> Any:
    """A pod setting declared once in :class:`PodSettings` and shared by the run's spec."""
    return copy.copy(PodSettings.model_fields[name])


# Once a run has a trainer Job (status.jobName) or has left CREATED, its spec is what the Job was built
# from: only these fields may still change (the operator acts on suspend; description is free text).
MUTABLE_ONCE_STARTED = ('suspend', 'description')


def _choice(value: str | None, names: tuple[str, ...], what: str) -> str | None:
    if value is not None and value not in names:
        close = [n for n in names if n.lower() == value.lower()]
        hint = f'did you mean {close[0]!r}?' if close else f'choose one of {", ".join(names)}'
        raise ValueError(f'unknown {what} {value!r}; {hint}')
    return value


class FinetuneRunSpec(_Model):
    """What to fine-tune, on which data, how, and with which cluster resources."""

    model_config = ConfigDict(
        json_schema_extra={
            'x-kubernetes-validations': [
                k8s_rule(
                    "!has(self.loss) || !(self.loss in ['CLIPLoss', 'CachedCLIPLoss']) "
                    '|| (has(self.multiModal) && self.multiModal)',
                    'loss CLIPLoss needs multiModal: true (text-image pairs)',
                    '.multiModal',
                ),
                k8s_rule(
                    '!has(self.multiModal) || !self.multiModal || !has(self.loss) '
                    "|| self.loss in ['CLIPLoss', 'CachedCLIPLoss']",
                    'multiModal: true trains text-image pairs; set loss CLIPLoss (or leave loss empty)',
                    '.loss',
                ),
                k8s_rule(
                    '!has(self.evalData) || !has(self.valSplit) || self.valSplit == 0.0',
                    'give either evalData or valSplit, not both',
                    '.valSplit',
                ),
                k8s_rule(
                    '!has(self.onnxQuantize) || (has(self.toOnnx) && self.toOnnx)',
                    'onnxQuantize makes an int8 copy of the ONNX model: set toOnnx: true as well',
                    '.onnxQuantize',
                ),
                k8s_rule(
                    '!has(self.minerOptions) || has(self.miner)',
                    'minerOptions given without miner',
                    '.minerOptions',
                ),
                k8s_rule(
                    '!has(self.lossOptimizerOptions) || has(self.lossOptimizer)',
                    'lossOptimizerOptions given without lossOptimizer',
                    '.lossOptimizerOptions',
                ),
                k8s_rule(
                    "!has(self.task) || self.task != 'synthesis' || has(self.synthesis)",
                    'task synthesis needs synthesis (corpusData and crossEncoder)',
                    '.synthesis',
                ),
                k8s_rule(
                    "!has(self.synthesis) || (has(self.task) && self.task == 'synthesis')",
                    'synthesis options are for task synthesis; set task: synthesis or remove synthesis',
                    '.task',
                ),
                k8s_rule(
                    "!has(self.hardNegatives) || !has(self.task) || self.task == 'finetune'",
                    'hardNegatives are mined before fine-tuning; a synthesis run takes none',
                    '.hardNegatives',
                ),
                k8s_rule(
                    "!has(self.task) || self.task != 'synthesis' || !has(self.resources) || "
                    '((!has(self.resources.nodes) || self.resources.nodes == 1) && '
                    '(!has(self.resources.gpus) || self.resources.gpus <= 1))',
                    'a synthesis run uses one node and at most one GPU',
                    '.resources',
                ),
            ]
        }
    )

    # --- model and data -----------------------------------------------------------------------
    model: str = Field(
        min_length=1,
        description='Backbone: a name from `finetuner models` (e.g. efficientnet_b0, bert-base-cased, '
        'openai/clip-vit-base-patch32) or an alias (resnet-base, clip-base-en, ...), "timm:<name>", '
        'any Hugging Face model id, a local directory or an s3:// prefix holding a Hugging Face model.',
    )
    model_options: FreeForm = Field(
        default_factory=dict,
        description='Backbone options: pooler (mean, cls, gem), max_length, image_size, pretrained.',
    )
    train_data: str = Field(
        min_length=1,
        max_length=URI_LENGTH,
        description='Training data: an s3:// or file:// URI (JSONL, CSV or docarray binary) or the name '
        'of a dataset pushed with finetuner.push_data(). Never inline data.',
    )
    eval_data: str | None = Field(
        default=None, max_length=URI_LENGTH, description='Evaluation data, same forms as trainData.'
    )
    val_split: float = Field(
        default=0.0, ge=0, lt=1, description='Fraction of trainData held out for validation when no evalData.'
    )
    model_artifact: str | None = Field(
        default=None,
        max_length=URI_LENGTH,
        description='Continue from an earlier artifact: a run name or an artifact URI.',
    )
    description: str | None = Field(default=None, max_length=2000, description='Free text about the run.')
    experiment: str = Field(
        default='default',
        description='Name of the Experiment this run belongs to.',
        json_schema_extra={'pattern': DNS1123_LABEL_PATTERN, 'maxLength': MAX_RUN_NAME},
    )
    task: Task = Field(
        default=Task.FINETUNE,
        description='finetune (train the model on trainData) or synthesis (train nothing: write training data for '
        'MarginMSELoss from the unlabelled queries in trainData and the documents of synthesis.corpusData, '
        'relations mined with model and scored by synthesis.crossEncoder; see finetuner.synthesize).',
    )
    synthesis: SynthesisOptions | None = Field(
        default=None, description='task synthesis: the corpus, the cross-encoder and relations per query.'
    )
    # --- objective ----------------------------------------------------------------------------
    loss: str | None = Field(
        default=None,
        json_schema_extra={'enum': list(LOSS_NAMES)},
        description='Loss: any pytorch-metric-learning loss, CLIPLoss (text-image pairs), '
        'MultipleNegativesRankingLoss (query-document pairs), CosineSimilarityLoss or MarginMSELoss '
        '(pairs with a score), or a Cached* variant (large batches in mini-batches). Empty: the recipe for '
        "the data's shape (docs/RECIPES.md), which also picks the miner, learning rate and schedule left empty.",
    )
    loss_options: FreeForm = Field(default_factory=dict, description='Keyword arguments of the loss.')
    miner: str | None = Field(
        default=None,
        json_schema_extra={'enum': list(MINER_NAMES)},
        description='A pytorch-metric-learning miner, e.g. TripletMarginMiner.',
    )
    miner_options: FreeForm = Field(default_factory=dict, description='Keyword arguments of the miner.')
    loss_optimizer: str | None = Field(
        default=None,
        json_schema_extra={'enum': list(OPTIMIZER_NAMES)},
        description='Optimizer for losses with parameters (ArcFaceLoss, CosFaceLoss, ProxyAnchorLoss).',
    )
    loss_optimizer_options: FreeForm = Field(
        default_factory=dict, description='Keyword arguments of the loss optimizer (lr defaults to learningRate).'
    )
    hard_negatives: HardNegativeOptions | None = Field(
        default=None,
        description='Mine hard negatives with the pretrained model before training: each (query, document) pair '
        'of trainData gets the closest other documents as explicit negatives (numNegatives, rangeMin, rangeMax, '
        'margins, samplingStrategy, crossEncoder; sentence-transformers semantics), for '
        'MultipleNegativesRankingLoss or TripletMarginLoss.',
    )
    # --- optimisation -------------------------------------------------------------------------
    optimizer: str = Field(
        default='Adam',
        json_schema_extra={'enum': list(OPTIMIZER_NAMES)},
        description='A torch.optim optimizer by name.',
    )
    optimizer_options: FreeForm = Field(
        default_factory=dict, description='Keyword arguments of the optimizer, e.g. {"weight_decay": 0.01}.'
    )
    learning_rate: float | None = Field(
        default=None, gt=0, le=1, description='Learning rate; empty picks the model family default.'
    )
    epochs: int = Field(
        default=5, ge=1, le=10000, description='Passes over the training data (see sampler for what one holds).'
    )
    batch_size: int | None = Field(
        default=None, ge=1, le=65536, description='Batch size; empty picks the largest batch that fits.'
    )
    scheduler: str | None = Field(
        default=None, json_schema_extra={'enum': list(SCHEDULER_NAMES)}, description='Learning-rate schedule by name.'
    )
    scheduler_options: SchedulerOptions = Field(
        default_factory=SchedulerOptions, description='Warm-up and stepping of the scheduler.'
    )
    callbacks: list[CallbackSpec] = Field(default_factory=list, max_length=32, description='Callbacks, in order.')
    freeze: bool = Field(default=False, description='Freeze the backbone; train only the projection head.')
    output_dim: int | None = Field(
        default=None, ge=1, le=16384, description='Attach a projection MLP with this output size.'
    )
    num_items_per_class: int = Field(
        default=4,
        ge=1,
        le=1024,
        description='Items per class in each batch (class-balanced sampling of labelled data; pairs trained '
        'with a label loss always put a query and its document together).',
    )
    sampler: Sampler = Field(
        default=Sampler.AUTO,
        description='Batch sampler: auto (class when labelled, else random); class: numItemsPerClass items of '
        'each class in a batch, an epoch one pass over the data (a large class spread over its batches); '
        'class-oversample: the same batches of distinct classes, an epoch as long as the largest class needs '
        '(small classes repeat: several passes on unbalanced data); random: shuffled batches.',
    )
    group_by_length: bool = Field(
        default=False,
        description='Batches of text: put texts of similar length together (random batches: sorted within windows '
        'of 50 batches; class-balanced batches: each class deals its items out longest first; batch order '
        'shuffled) so dynamic padding wastes less compute. Off by default: batches of similar lengths gave a '
        "smaller retrieval uplift, and on the CPU the trainer already pads little by running a batch's texts in "
        'parts cut by token count.',
    )
    multi_modal: bool = Field(default=False, description='Text-image data (CLIP): one text and one image per item.')
    image_modality: str | None = Field(
        default=None, max_length=63, description='Modality name of the image chunk (CLIP).'
    )
    text_modality: str | None = Field(
        default=None, max_length=63, description='Modality name of the text chunk (CLIP).'
    )
    csv_options: CSVOptions = Field(default_factory=CSVOptions, description='How CSV data is read.')
    device: Device = Field(default=Device.AUTO, description='auto (CUDA when present), cuda or cpu.')
    num_workers: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description='Data-loader worker processes; empty picks: none for text-only data on the CPU (tokenizing '
        'in the training process is cheaper than shipping batches between processes), else min(4, cores).',
    )
    to_onnx: bool = Field(default=False, description='Also export the model to ONNX (checked against torch).')
    onnx_quantize: OnnxQuantization | None = Field(
        default=None,
        description="Also ship an int8 ONNX model beside the float one (needs toOnnx), made with ONNX Runtime's "
        'quantisation tools: auto quantises text graphs dynamically (int8 weights, activations per batch) and '
        'image graphs statically (QDQ, activation ranges calibrated on a sample of the training data); dynamic or '
        'static forces one method on every graph. The int8 model is evaluated on the evaluation data too '
        '(status.metrics.quantized) and is what get_model(..., is_onnx=True) loads.',
    )
    seed: int = Field(default=42, ge=0, description='Random seed of sampling, splits and initialisation.')
    checkpoint_every_steps: int | None = Field(
        default=None, ge=1, description='Also checkpoint every N steps (checkpoints are always taken per epoch).'
    )
    # --- cluster ------------------------------------------------------------------------------
    resources: Resources = Field(default_factory=Resources, description='Compute per node and node count.')
    image: str | None = Field(
        default=None, max_length=1024, description='Trainer image override (default: the operator setting).'
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, max_length=64, description='Node labels the pods must match.'
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description='Tolerations of the trainer pods.'
    )
    queue_name: str | None = Field(
        default=None, max_length=63, description='Kueue LocalQueue; the Job waits there for admission.'
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=60, description='Fail the run after this many seconds of running.'
    )
    backoff_limit: int = Field(default=3, ge=0, le=20, description='Retries after infrastructure failures.')
    output: str | None = Field(
        default=None,
        max_length=URI_LENGTH,
        description='Where artifacts go (s3:// or file:// prefix); default: the operator setting.',
    )
    suspend: bool = Field(default=False, description='True stops the run (its pods are removed) until false.')
    # --- pod settings (finetuner.api.pod; the Helm values' runtime template gives their defaults) ------
    image_pull_secrets: list[LocalObjectReference] = _pod_field('image_pull_secrets')
    affinity: Affinity | None = _pod_field('affinity')
    priority_class_name: str | None = _pod_field('priority_class_name')
    env: list[EnvVar] = _pod_field('env')
    volumes: list[Volume] = _pod_field('volumes')
    service_account_name: str | None = _pod_field('service_account_name')

    def pod_settings(self) -> PodSettings:
        return PodSettings.model_validate({name: getattr(self, name) for name in POD_SETTING_FIELDS})

    @model_serializer(mode='wrap')
    def _wire(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """The camelCase wire form leaves out empty option maps (their default), so that a CEL rule can tell
        "minerOptions given" by ``has()``: Kubernetes' CEL cannot look inside a free-form map."""
        data = handler(self)
        if info.by_alias:
            data = {k: v for k, v in data.items() if not (k.endswith('Options') and v == {})}
        return data

    @field_validator('loss')
    @classmethod
    def _known_loss(cls, value: str | None) -> str | None:
        return _choice(value, LOSS_NAMES, 'loss')

    @field_validator('miner')
    @classmethod
    def _known_miner(cls, value: str | None) -> str | None:
        return _choice(value, MINER_NAMES, 'miner')

    @field_validator('optimizer')
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return _choice(value, OPTIMIZER_NAMES, 'optimizer')  # type: ignore[return-value]

    @field_validator('loss_optimizer')
    @classmethod
    def _known_loss_optimizer(cls, value: str | None) -> str | None:
        return _choice(value, OPTIMIZER_NAMES, 'lossOptimizer')

    @field_validator('scheduler')
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        return _choice(value, SCHEDULER_NAMES, 'scheduler')

    @field_validator('experiment')
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        return check_dns1123_name(value, 'experiment')

    @model_validator(mode='after')
    def _bounded_size(self) -> FinetuneRunSpec:
        sizes = {
            key: len(json.dumps(value, separators=(',', ':')))
            for key, value in self.model_dump(mode='json', by_alias=True).items()
        }
        total = sum(sizes.values())
        if total > MAX_SPEC_BYTES:
            largest = max(sizes, key=lambda key: sizes[key])
            raise ValueError(
                f'the spec is {total // 1024} KiB, over the limit of {MAX_SPEC_BYTES // 1024} KiB '
                f'({largest} alone is {sizes[largest] // 1024} KiB): keep data out of the spec and reference it '
                'by URI or dataset name'
            )
        return self

    @model_validator(mode='after')
    def _coherent(self) -> FinetuneRunSpec:
        clip_losses = ('CLIPLoss', 'CachedCLIPLoss')
        if self.loss in clip_losses and not self.multi_modal:
            raise ValueError(f'loss {self.loss} needs multiModal: true (text-image pairs)')
        if self.multi_modal and self.loss not in (None, *clip_losses):
            raise ValueError(
                f'multiModal: true trains text-image pairs; set loss CLIPLoss or leave it empty (got {self.loss})'
            )
        if self.val_split and self.eval_data:
            raise ValueError('give either evalData or valSplit, not both')
        if self.loss_optimizer_options and not self.loss_optimizer:
            raise ValueError('lossOptimizerOptions given without lossOptimizer')
        if self.miner_options and not self.miner:
            raise ValueError('minerOptions given without miner')
        self._coherent_task()
        if self.onnx_quantize is not None and not self.to_onnx:
            raise ValueError('onnxQuantize makes an int8 copy of the ONNX model: set toOnnx: true as well')
        self.pod_settings()  # env and volume names given twice
        return self

    def _coherent_task(self) -> None:
        if self.task == Task.SYNTHESIS.value:
            if self.synthesis is None:
                raise ValueError('task synthesis needs synthesis (corpusData and crossEncoder)')
            if self.hard_negatives is not None:
                raise ValueError('hardNegatives are mined before fine-tuning; a synthesis run takes none')
            if self.resources.nodes != 1 or self.resources.gpus > 1:
                raise ValueError('a synthesis run uses one node and at most one GPU (resources.nodes 1, gpus <= 1)')
        elif self.synthesis is not None:
            raise ValueError('synthesis options are for task synthesis; set task: synthesis or remove synthesis')


# ---------------------------------------------------------------------------------------------
# FinetuneRun status
# ---------------------------------------------------------------------------------------------


class Condition(_Model):
    type: str = Field(description='Condition type: Created, Started, Succeeded, Failed, Suspended.')
    status: Literal['True', 'False', 'Unknown'] = Field(description='True, False or Unknown.')
    reason: str | None = Field(default=None, description='CamelCase reason of the last transition.')
    message: str | None = Field(default=None, description='What a person can act on.')
    last_transition_time: str | None = Field(default=None, description='RFC 3339 time of the last change.')


class Progress(_Model):
    """What the trainer reports while it runs (``progress.json`` in its output location)."""

    epoch: int = Field(default=0, ge=0, description='Current epoch, 1-based (0 before the first).')
    epochs: int = Field(default=0, ge=0, description='Epochs planned.')
    step: int = Field(default=0, ge=0, description='Optimizer steps done so far.')
    total_steps: int = Field(default=0, ge=0, description='Optimizer steps planned.')
    percent: float = Field(default=0.0, ge=0, le=100, description='Share of the planned steps done.')
    eta_seconds: float | None = Field(default=None, ge=0, description='Estimated seconds to the end.')
    loss: float | None = Field(default=None, description='Latest training loss (running mean).')
    metrics: dict[str, float] = Field(default_factory=dict, description='Latest evaluation metrics.')
    updated_at: str | None = Field(default=None, description='RFC 3339 time of this report.')


class QuantizedMetrics(_Model):
    """The int8 ONNX model (``onnxQuantize``) evaluated like the float model, and what it lost."""

    methods: dict[str, str] = Field(
        default_factory=dict, description='How each ONNX graph was quantised (content kind -> dynamic or static).'
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description='Evaluation of the int8 ONNX model, on the same data as after.'
    )
    relative_change: dict[str, float] = Field(
        default_factory=dict,
        description='Per metric, the int8 model against the float one in percent (int8 / float - 1; negative: '
        'lost by quantisation).',
    )


class RunMetrics(_Model):
    before: dict[str, float] = Field(default_factory=dict, description='Evaluation before fine-tuning.')
    after: dict[str, float] = Field(default_factory=dict, description='Evaluation after fine-tuning.')
    quantized: QuantizedMetrics | None = Field(
        default=None, description='Evaluation of the int8 ONNX model (onnxQuantize) and its change against after.'
    )

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> RunMetrics:
        """The parts of the trainer's metrics.json that the status carries (not the per-epoch history)."""
        return cls.model_validate({k: v for k, v in report.items() if k in ('before', 'after', 'quantized')})

    # Finetuner's run.metrics() is the dict {'before': {...}, 'after': {...}}; code written for it
    # (``metrics['after']['mrr']``, ``for stage in metrics: metrics[stage]``, ``dict(metrics)``) reads this
    # model the same way. The int8 model's evaluation stays an attribute (``quantized``).
    STAGES: ClassVar[tuple[str, str]] = ('before', 'after')

    def __getitem__(self, stage: str) -> dict[str, float]:
        if stage not in self.STAGES:
            raise KeyError(stage)
        return self.before if stage == 'before' else self.after

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # a mapping's keys, not pydantic's pairs
        return iter(self.STAGES)

    def keys(self) -> tuple[str, str]:
        return self.STAGES

    def items(self) -> list[tuple[str, dict[str, float]]]:
        return [(stage, self[stage]) for stage in self.STAGES]


class FinetuneRunStatus(_Model):
    phase: Phase | None = Field(default=None, description='CREATED, STARTED, FINISHED or FAILED.')
    details: str | None = Field(default=None, description='What is happening, in words a person can act on.')
    reason: str | None = Field(default=None, description='CamelCase reason of the current phase.')
    conditions: list[Condition] = Field(default_factory=list, description='Standard conditions.')
    start_time: str | None = Field(default=None, description='When a trainer pod first ran.')
    completion_time: str | None = Field(default=None, description='When the run finished or failed.')
    attempts: int = Field(default=0, ge=0, description='Trainer pod attempts so far.')
    progress: Progress | None = Field(default=None, description='Live progress reported by the trainer.')
    metrics: RunMetrics | None = Field(default=None, description='Evaluation metrics before and after.')
    artifact_uri: str | None = Field(default=None, description='Where the fine-tuned model is.')
    output_uri: str | None = Field(default=None, description="The run's output location (artifact, logs).")
    job_name: str | None = Field(default=None, description='Name of the trainer Job.')
    observed_generation: int | None = Field(default=None, description='Spec generation last acted upon.')
    restarts: int | None = Field(
        default=None,
        ge=0,
        description='Multi-node runs: restarts of all their pods together (after a node failed or was evicted), '
        'each from the last checkpoint.',
    )
    failed_attempts: int | None = Field(
        default=None,
        ge=0,
        description='Multi-node runs: the restarts that count against spec.backoffLimit (a failure; an eviction '
        'or preemption does not count).',
    )


# ---------------------------------------------------------------------------------------------
# Experiment
# ---------------------------------------------------------------------------------------------


class SweepKind(str, Enum):
    GRID = 'grid'
    RANDOM = 'random'


class Sweep(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            'x-kubernetes-validations': [
                k8s_rule(
                    "!has(self.kind) || self.kind != 'random' || has(self.count)",
                    'a random sweep needs count',
                    '.count',
                )
            ]
        }
    )

    kind: SweepKind = Field(default=SweepKind.GRID, description='grid (every combination) or random.')
    parameters: dict[str, list[Any]] = Field(
        description='FinetuneRun spec fields (camelCase) and the values to try, e.g. '
        '{"learningRate": [1e-5, 1e-4], "loss": ["TripletMarginLoss", "ArcFaceLoss"]}.',
        # a parameter's values can be of any type, so CEL cannot see them: which names are spec fields is
        # the operator's check; at least one parameter with at least one value is the schema's
        json_schema_extra={'minProperties': 1, 'additionalProperties': {'type': 'array', 'minItems': 1, 'items': {}}},
    )
    count: int | None = Field(default=None, ge=1, le=1000, description='random: how many points to draw.')
    seed: int = Field(default=0, ge=0, description='random: the seed of the draw.')
    parallelism: int = Field(default=1, ge=1, le=1000, description='Runs of the sweep active at once.')

    @model_validator(mode='after')
    def _parameters_are_spec_fields(self) -> Sweep:
        known = {f.alias or n for n, f in FinetuneRunSpec.model_fields.items()}
        for key, values in self.parameters.items():
            if key not in known:
                raise ValueError(f'sweep parameter {key!r} is not a FinetuneRun spec field')
            if not values:
                raise ValueError(f'sweep parameter {key!r} has no values')
        if self.kind == SweepKind.RANDOM and self.count is None:
            raise ValueError('a random sweep needs count')
        if not self.parameters:
            raise ValueError('a sweep needs at least one parameter')
        return self


class BestRunSelector(_Model):
    metric: str = Field(default='mrr', description='Metric of status.metrics.after to rank runs by.')
    mode: Literal['max', 'min'] = Field(default='max', description='max or min.')


class ExperimentSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            'x-kubernetes-validations': [
                k8s_rule(
                    '!has(self.sweep) || has(self.runTemplate)',
                    'a sweep needs runTemplate (the FinetuneRun spec its points change)',
                    '.runTemplate',
                )
            ]
        }
    )

    description: str | None = Field(default=None, max_length=2000, description='Free text.')
    run_template: FreeForm | None = Field(
        default=None, description='FinetuneRun spec (camelCase) that sweep points are applied to.'
    )
    sweep: Sweep | None = Field(default=None, description='Create one FinetuneRun per point of this sweep.')
    best_run: BestRunSelector = Field(default_factory=BestRunSelector, description='How the best run is chosen.')

    @model_validator(mode='after')
    def _sweep_has_template(self) -> ExperimentSpec:
        if self.sweep is not None and self.run_template is None:
            raise ValueError('a sweep needs runTemplate (the FinetuneRun spec its points change)')
        return self


class RunCounts(_Model):
    total: int = Field(default=0, ge=0, description='Runs in the experiment.')
    created: int = Field(default=0, ge=0, description='Runs in phase CREATED.')
    started: int = Field(default=0, ge=0, description='Runs in phase STARTED.')
    finished: int = Field(default=0, ge=0, description='Runs in phase FINISHED.')
    failed: int = Field(default=0, ge=0, description='Runs in phase FAILED.')


class BestRun(_Model):
    name: str = Field(description='Run name.')
    metric: str = Field(description='Metric name.')
    value: float = Field(description='Metric value.')


class ExperimentStatus(_Model):
    runs: RunCounts = Field(default_factory=RunCounts, description='Runs counted by phase.')
    best_run: BestRun | None = Field(default=None, description='The best finished run so far.')
    sweep_created: int = Field(default=0, ge=0, description='Sweep points turned into runs so far.')
    observed_generation: int | None = Field(default=None, description='Spec generation last acted upon.')


# ---------------------------------------------------------------------------------------------
# Whole objects
# ---------------------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata the contract cares about; the rest is kept as is."""

    model_config = ConfigDict(extra='allow', populate_by_name=True)
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator('name')
    @classmethod
    def _dns_name(cls, value: str) -> str:
        return check_dns1123_name(value, 'metadata.name')


class FinetuneRun(_Model):
    api_version: Literal['finetuner.dev/v1alpha1'] = Field(default=API_VERSION, alias='apiVersion')
    kind: Literal['FinetuneRun'] = 'FinetuneRun'
    metadata: ObjectMeta
    spec: FinetuneRunSpec
    status: FinetuneRunStatus | None = None


class Experiment(_Model):
    api_version: Literal['finetuner.dev/v1alpha1'] = Field(default=API_VERSION, alias='apiVersion')
    kind: Literal['Experiment'] = 'Experiment'
    metadata: ObjectMeta
    spec: ExperimentSpec = Field(default_factory=ExperimentSpec)
    status: ExperimentStatus | None = None


# ---------------------------------------------------------------------------------------------
# What the trainer process is handed (the ConfigMap's content; a file on the local backend)
# ---------------------------------------------------------------------------------------------


class TrainerConfig(_Model):
    run_name: str = Field(description='Name of the run.')
    namespace: str = Field(default='default', description='Namespace (or "local").')
    spec: FinetuneRunSpec = Field(description='The run spec.')
    output_uri: str = Field(description="The run's own output prefix (s3:// or file://).")
    data_uri: str | None = Field(default=None, description='Prefix where named datasets live (datasets/<name>/...).')
    termination_log: str = Field(
        default='/dev/termination-log', description='Where a one-line failure reason is written.'
    )


CRD_KINDS: dict[str, dict[str, Any]] = {
    'FinetuneRun': {
        'plural': 'finetuneruns',
        'singular': 'finetunerun',
        'short_names': ['ftr', 'ftrun'],
        'spec': FinetuneRunSpec,
        'status': FinetuneRunStatus,
        'mutable_once_started': MUTABLE_ONCE_STARTED,
        'printer_columns': [
            {'name': 'Phase', 'type': 'string', 'jsonPath': '.status.phase'},
            {'name': 'Model', 'type': 'string', 'jsonPath': '.spec.model'},
            {'name': 'Loss', 'type': 'string', 'jsonPath': '.spec.loss'},
            {'name': 'Progress', 'type': 'number', 'jsonPath': '.status.progress.percent'},
            {'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'},
            # -o wide
            {'name': 'Reason', 'type': 'string', 'jsonPath': '.status.reason', 'priority': 1},
            {'name': 'Experiment', 'type': 'string', 'jsonPath': '.spec.experiment', 'priority': 1},
            {'name': 'GPUs', 'type': 'integer', 'jsonPath': '.spec.resources.gpus', 'priority': 1},
            {'name': 'Job', 'type': 'string', 'jsonPath': '.status.jobName', 'priority': 1},
            {'name': 'Task', 'type': 'string', 'jsonPath': '.spec.task', 'priority': 1},
        ],
    },
    'Experiment': {
        'plural': 'experiments',
        'singular': 'experiment',
        'short_names': ['ftexp'],
        'spec': ExperimentSpec,
        'status': ExperimentStatus,
        'printer_columns': [
            {'name': 'Runs', 'type': 'integer', 'jsonPath': '.status.runs.total'},
            {'name': 'Finished', 'type': 'integer', 'jsonPath': '.status.runs.finished'},
            {'name': 'Failed', 'type': 'integer', 'jsonPath': '.status.runs.failed'},
            {'name': 'Best', 'type': 'string', 'jsonPath': '.status.bestRun.name'},
            {'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'},
            {'name': 'Created', 'type': 'integer', 'jsonPath': '.status.runs.created', 'priority': 1},
            {'name': 'Started', 'type': 'integer', 'jsonPath': '.status.runs.started', 'priority': 1},
            {'name': 'Sweep', 'type': 'integer', 'jsonPath': '.status.sweepCreated', 'priority': 1},
        ],
    },
}
