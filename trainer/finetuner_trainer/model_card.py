"""The model card (``README.md``) of every artifact, in the form the Hugging Face hub reads.

The facts of the run (:class:`CardFacts`: base model, task, data sizes, loss, hyper-parameters,
metrics before and after) are gathered once when the artifact is published. A text model is saved
by sentence-transformers, whose own card is generated from its model-card data
(``SentenceTransformerModelCardData``: base model, datasets with their size and loss, hyper-parameters,
training logs) filled from these facts; timm and CLIP models get a card of the same shape written
here. Either way the YAML front matter carries ``base_model`` (when it is a hub id), ``library_name``,
``pipeline_tag``, tags and a ``model-index`` of the metrics after fine-tuning, and the body a
"Fine-tuned with kube-finetuner" section: the facts, the metrics before and after, and how to load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

README = 'README.md'
TAG = 'kube-finetuner'
# What each family's folder is read with, and the hub's pipeline for it.
LIBRARY = {'text': 'sentence-transformers', 'timm': 'timm', 'clip': 'transformers'}
PIPELINE = {'text': 'sentence-similarity', 'timm': 'image-feature-extraction', 'clip': 'zero-shot-image-classification'}
SHAPES = {
    'labelled': 'labelled items',
    'pairs': 'query-document pairs',
    'scored-pairs': 'scored pairs',
    'text-image': 'text-image pairs',
}
METRIC_NAMES = {
    'mrr': 'MRR@{k}',
    'map': 'MAP@{k}',
    'ndcg_at_k': 'NDCG@{k}',
    'precision_at_k': 'Precision@{k}',
    'recall_at_k': 'Recall@{k}',
    'hit_at_k': 'Hit@{k}',
}


@dataclass
class CardFacts:
    """What a model card says about a fine-tuned model (gathered by ``runner.publish_artifact``)."""

    run_name: str
    model: str  # the spec's model, as the user gave it
    base_model_id: str | None  # a Hugging Face id, when the weights came from one
    family: str
    task: str  # image-to-image, text-to-text, text-to-image
    output_dim: int
    pretrained: bool
    data_shape: str  # labelled, pairs, scored-pairs, text-image
    train_size: int
    train_source: str
    eval_size: int | None
    eval_source: str | None
    classes: int | None
    loss: str
    miner: str | None
    hyperparameters: dict[str, Any]
    non_default: dict[str, Any]
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    limit: int = 20

    @property
    def model_name(self) -> str:
        return f'{self.base_model_id or Path(self.model).name} fine-tuned with kube-finetuner ({self.run_name})'

    def data_sentence(self) -> str:
        classes = f' in {self.classes} classes' if self.classes else ''
        text = f'{self.train_size} {SHAPES.get(self.data_shape, self.data_shape)}{classes} ({self.train_source})'
        if self.eval_size:
            text += f'; evaluated on {self.eval_size} held-out examples ({self.eval_source})'
        return text


def data_name_of_reference(reference: str) -> str:
    """A dataset's name for the card: its last part (a dataset's folder name), never a bucket or a local path."""
    parts = [part for part in reference.rstrip('/').split('/') if part]
    if len(parts) >= 2 and parts[-1] in ('data.jsonl', 'data.csv'):
        return parts[-2]
    return parts[-1] if parts else reference


def base_model_of(model: str, source: str, family: str, embedder: Any) -> str | None:
    """The Hugging Face id the starting weights came from, or None (a local folder, random weights)."""
    from finetuner.catalog import find_backbone

    backbone = find_backbone(model)
    if family == 'timm':
        config = getattr(getattr(embedder, 'backbone', None), 'pretrained_cfg', None) or {}
        return config.get('hf_hub_id') or None
    if backbone is not None:
        return backbone.source  # the catalog's sources are hub ids (an offline copy is of the same weights)
    if Path(source).is_dir():
        readme = Path(source) / README
        return _front_matter(readme).get('base_model') if readme.is_file() else None
    return model if model.count('/') == 1 and not model.startswith(('.', '/')) else None


def _front_matter(readme: Path) -> dict[str, Any]:
    import yaml

    text = readme.read_text(encoding='utf-8')
    if not text.startswith('---'):
        return {}
    try:
        data = yaml.safe_load(text.split('---', 2)[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# --- sentence-transformers' own card data (text models) ------------------------------------------


def st_card_data(facts: CardFacts) -> Any:
    """``SentenceTransformerModelCardData`` filled from the facts, read by sentence-transformers when it
    saves the model (it never asks the hub: ``local_files_only``)."""
    try:
        from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.model_card import SentenceTransformerModelCardData

    columns = ['anchor', 'positive'] if facts.data_shape != 'labelled' else ['text', 'label']
    if facts.data_shape == 'scored-pairs':
        columns.append('score')
    loss = {'fullname': _loss_fullname(facts.loss)}
    data = SentenceTransformerModelCardData(
        model_name=facts.model_name,
        train_datasets=[{'name': facts.train_source, 'size': facts.train_size, 'columns': columns, 'loss': loss}],
        eval_datasets=(
            [{'name': facts.eval_source, 'size': facts.eval_size, 'columns': columns, 'loss': loss}]
            if facts.eval_size
            else []
        ),
        local_files_only=True,
        generate_widget_examples=False,
    )
    data.base_model = facts.base_model_id
    data.all_hyperparameters = dict(facts.hyperparameters)
    data.non_default_hyperparameters = dict(facts.non_default)
    data.training_logs = _training_logs(facts)
    data.add_tags([TAG, f'loss:{facts.loss}'])
    return data


def _loss_fullname(loss: str) -> str:
    from finetuner.catalog import PML_LOSS_NAMES

    if loss in PML_LOSS_NAMES:
        return f'pytorch_metric_learning.losses.{loss}'
    return f'finetuner_trainer.losses.{loss}'


def _training_logs(facts: CardFacts) -> list[dict[str, Any]]:
    rows = []
    epochs = max(1, int(facts.hyperparameters.get('epochs') or 1))
    steps = int(facts.hyperparameters.get('total_steps') or 0)
    for entry in facts.history:
        epoch = int(entry.get('epoch', 0))
        row: dict[str, Any] = {'Epoch': epoch, 'Step': round(steps * epoch / epochs)}
        if entry.get('train_loss') is not None:
            row['Training Loss'] = round(float(entry['train_loss']), 4)
        if entry.get('val_loss') is not None:
            row['Validation Loss'] = round(float(entry['val_loss']), 4)
        for name in ('mrr', 'ndcg_at_k'):
            if isinstance(entry.get(name), (int, float)):
                row[name] = round(float(entry[name]), 4)
        rows.append(row)
    return rows


# --- the card ------------------------------------------------------------------------------------


def write_card(folder: Path, facts: CardFacts, load: str | None) -> Path:
    """README.md of the artifact folder: sentence-transformers' card (text) or a new one (timm, CLIP),
    with the metadata and the kube-finetuner section added. Returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(folder) / README
    if path.is_file():
        card = ModelCard.load(path)
        card.text = card.text.rstrip() + '\n\n' + section(facts, load) + '\n'
    else:
        data = ModelCardData(language=None, library_name=LIBRARY.get(facts.family))
        body = f'# {facts.model_name}\n\n{_intro(facts)}\n\n{section(facts, load)}\n'
        card = ModelCard(f'---\n{data.to_yaml()}\n---\n\n{body}')
    _set_metadata(card.data, facts)
    card.save(path)
    return path


def _set_metadata(data: Any, facts: CardFacts) -> None:
    from huggingface_hub import EvalResult

    if facts.base_model_id:
        data.base_model = facts.base_model_id
    data.library_name = data.library_name or LIBRARY.get(facts.family)
    data.pipeline_tag = getattr(data, 'pipeline_tag', None) or PIPELINE.get(facts.family)
    tags = list(data.tags or [])
    for tag in (TAG, facts.task, f'loss:{facts.loss}'):
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    data.model_name = facts.model_name
    data.eval_results = [
        EvalResult(
            task_type='information-retrieval',
            task_name='Information Retrieval',
            dataset_type='held-out',
            dataset_name=facts.eval_source or 'evaluation data',
            metric_type=metric,
            metric_value=round(float(facts.after[metric]), 4),
            metric_name=pattern.format(k=facts.limit),
        )
        for metric, pattern in METRIC_NAMES.items()
        if isinstance(facts.after.get(metric), (int, float))
    ] or None


def _intro(facts: CardFacts) -> str:
    start = (
        f'[{facts.base_model_id}](https://huggingface.co/{facts.base_model_id})'
        if facts.base_model_id
        else f'`{facts.model}`'
    )
    kinds = {'text': 'texts', 'timm': 'images', 'clip': 'texts and images'}.get(facts.family, 'items')
    return (
        f'A {facts.family} embedding model fine-tuned from {start} for {facts.task} retrieval with kube-finetuner. '
        f'It maps {kinds} to {facts.output_dim}-dimensional embeddings.'
    )


def section(facts: CardFacts, load: str | None) -> str:
    """The "Fine-tuned with kube-finetuner" part of the card: facts, metrics, loading."""
    base = facts.base_model_id or f'`{Path(facts.model).name}` (a local model folder)'
    if not facts.pretrained:
        base += ', from random weights (pretrained: false)'
    lines = [
        '## Fine-tuned with kube-finetuner',
        '',
        f'- **Run:** `{facts.run_name}`',
        f'- **Base model:** {base}',
        f'- **Task:** {facts.task} ({facts.family} family), {facts.output_dim}-dimensional embeddings',
        f'- **Training data:** {facts.data_sentence()}',
        f'- **Loss:** {facts.loss}' + (f' with {facts.miner}' if facts.miner else ''),
        '',
        '### Hyper-parameters',
        '',
        '| name | value |',
        '|---|---|',
        *(f'| {name} | {value} |' for name, value in facts.hyperparameters.items()),
    ]
    lines += ['', *metrics_table(facts), '', *loading(facts, load)]
    return '\n'.join(lines)


def metrics_table(facts: CardFacts) -> list[str]:
    names = sorted(set(facts.before) | set(facts.after))
    if not names:
        return ['### Retrieval metrics', '', 'The run had no evaluation data (no eval_data or val_split).']
    rows = [
        f'### Retrieval metrics (k = {facts.limit}, on {facts.eval_source or "the evaluation data"})',
        '',
        '| metric | before | after | change |',
        '|---|---:|---:|---:|',
    ]
    for name in names:
        before, after = facts.before.get(name), facts.after.get(name)
        change = f'{after - before:+.4f}' if before is not None and after is not None else ''
        rows.append(f'| {name} | {_number(before)} | {_number(after)} | {change} |')
    return rows


def _number(value: float | None) -> str:
    return '' if value is None else f'{value:.4f}'


def loading(facts: CardFacts, load: str | None) -> list[str]:
    snippet = {
        'text': [
            'from sentence_transformers import SentenceTransformer',
            "model = SentenceTransformer('<this folder or repo id>')",
            "embeddings = model.encode(['How are you?'])",
        ],
        'timm': [
            'import json, timm, torch',
            'from safetensors.torch import load_file',
            "config = json.load(open('<folder>/config.json'))",
            "model = timm.create_model(config['architecture'], pretrained=False, num_classes=0)",
            "model.load_state_dict(load_file('<folder>/model.safetensors'))",
        ],
        'clip': [
            'from transformers import CLIPModel, CLIPProcessor',
            "model = CLIPModel.from_pretrained('<this folder or repo id>')",
            "processor = CLIPProcessor.from_pretrained('<this folder or repo id>')",
        ],
    }.get(facts.family, [])
    lines = ['### How to load it', '', 'With kube-finetuner (the same preprocessing and pooling as in training):', '']
    lines += [
        '```python',
        'import finetuner',
        "model = finetuner.get_model('<this folder or repo id>')",
        "embeddings = finetuner.encode(model, ['How are you?'])"
        if facts.family != 'timm'
        else "embeddings = finetuner.encode(model, ['photo.jpg'])",
        '```',
    ]
    if snippet:
        lines += ['', f'With {LIBRARY[facts.family]} alone:', '', '```python', *snippet, '```']
    if load:
        lines += ['', f'Recipe recorded by the trainer: `{load}`']
    return lines
