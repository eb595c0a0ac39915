"""A stand-in for ``python -m finetuner_trainer`` for the console tests: in well under a second it
writes what the real trainer writes (``finetuner.api.layout``): progress.json and its loss history,
metrics.json per epoch, examples.json with image thumbnails, a log and an artifact (manifest last).
It writes through ``finetuner.storage``, so the same script serves the local backend (file://) and the
simulated cluster (s3:// on the moto server).

``spec.modelOptions`` steer it:

- ``steps`` (default 6): optimizer steps in all, spread over ``spec.epochs``;
- ``hold_at`` + ``gate``: after step ``hold_at`` it waits until the file ``gate`` exists (a run that
  stays STARTED until the test lets it go on);
- ``step_seconds`` (default 0.02): pause after each step;
- ``fail``: after the first step it exits with this message (the run ends FAILED).
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for part in ('sdk', 'trainer', ''):  # the simulated node starts it without this checkout on the path
    if str(ROOT / part) not in sys.path:
        sys.path.insert(0, str(ROOT / part))

from finetuner.api import layout  # noqa: E402
from finetuner.api.v1alpha1 import TrainerConfig  # noqa: E402
from finetuner.storage import open_store  # noqa: E402

COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (30, 40, 220)}
METRIC_NAMES = ('mrr', 'map', 'ndcg_at_k', 'precision_at_k', 'recall_at_k', 'hit_at_k')


def thumbnail(colour: str, seed: int) -> str:
    from PIL import Image

    from tests.support.tiny import png_bytes

    picture = Image.open(io.BytesIO(png_bytes(COLOURS[colour], size=32, seed=seed))).convert('RGB')
    out = io.BytesIO()
    picture.save(out, format='JPEG', quality=80)
    return 'data:image/jpeg;base64,' + base64.b64encode(out.getvalue()).decode()


def examples(after: bool) -> list[dict[str, Any]]:
    """Three image queries; before fine-tuning one match in three is relevant, after all are."""
    out = []
    for q, colour in enumerate(COLOURS):
        matches = []
        for position in range(3):
            relevant = after or position == 2
            label = colour if relevant else next(c for c in COLOURS if c != colour)
            matches.append(
                {
                    'content': f'<image, {300 + q * 10 + position} bytes>',
                    'label': label,
                    'distance': round(0.1 * (position + 1) + (0.0 if after else 0.3), 6),
                    'relevant': relevant,
                    'image': thumbnail(label, seed=q * 10 + position),
                }
            )
        out.append(
            {
                'query': f'<image, {200 + q} bytes>',
                'label': colour,
                'image': thumbnail(colour, 100 + q),
                'matches': matches,
            }
        )
    return out


def evaluation(epoch: int, epochs: int, learning_rate: float | None) -> dict[str, float]:
    """Better with every epoch; a learning rate away from 1e-3 gains less (a sweep has a best point)."""
    gain = 1.0 if learning_rate is None else max(0.0, 1.0 - abs(math.log10(learning_rate) + 3.0) / 4.0)
    quality = 0.4 + 0.5 * gain * epoch / max(epochs, 1)
    return {name: round(quality - 0.02 * i, 4) for i, name in enumerate(METRIC_NAMES)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--config', required=True)
    config = TrainerConfig.model_validate_json(Path(parser.parse_args().config).read_text())
    out = open_store(config.output_uri)
    options = config.spec.model_options
    epochs, steps = config.spec.epochs, int(options.get('steps', 6))
    per_epoch = max(1, steps // epochs)
    print(f'stand-in trainer: run {config.run_name}, {epochs} epochs of {per_epoch} steps', flush=True)
    rate = config.spec.learning_rate
    before = evaluation(0, epochs, rate)
    out.write_json(layout.METRICS, {'before': before, 'after': {}, 'epochs': []})
    out.write_json(layout.EXAMPLES, {'before': examples(after=False), 'after': []})
    points: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(per_epoch):
            step += 1
            loss = round(1.0 / (1.0 + 0.4 * step), 4)
            points.append({'step': step, 'epoch': epoch, 'loss': loss, 'time': '2026-01-01T00:00:00+00:00'})
            progress = {'epoch': epoch, 'epochs': epochs, 'step': step, 'totalSteps': per_epoch * epochs, 'loss': loss}
            progress['percent'] = round(100.0 * step / (per_epoch * epochs), 2)
            out.write_json(layout.PROGRESS_HISTORY, {'points': points})
            out.write_json(layout.PROGRESS, progress)
            print(f'epoch {epoch}/{epochs} step {step} loss {loss:.4f}', flush=True)
            if options.get('fail'):
                Path(config.termination_log).write_text(str(options['fail']))
                print(f'error: {options["fail"]}', file=sys.stderr, flush=True)
                return 1
            if step == options.get('hold_at'):
                while not Path(options['gate']).exists():
                    time.sleep(0.05)
            time.sleep(float(options.get('step_seconds', 0.02)))
        metrics = evaluation(epoch, epochs, rate)
        history.append({'epoch': epoch, 'train_loss': loss, 'val_loss': round(loss * 1.1, 4), **metrics})
        out.write_json(layout.METRICS, {'before': before, 'after': metrics, 'epochs': history})
        out.write_json(layout.EXAMPLES, {'before': examples(after=False), 'after': examples(after=True)})
    out.write_json(f'{layout.ARTIFACT}/model.safetensors', {'weights': [0.1, 0.2]})
    out.write_json(f'{layout.ARTIFACT}/config.json', {'model': config.spec.model})
    files = {'model.safetensors': {}, 'config.json': {}}
    out.write_json(layout.ARTIFACT_MANIFEST, {'files': files, 'format': 'stand-in'})
    print('stand-in trainer: artifact published', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
