"""What each tier of ``python -m bench --gpu`` leaves in the output folder, and how it is read back.

One JSON file per tier (``gpu-<tier>.json``), rewritten after every measurement so that a tier
stopped by its timeout still brings back what it measured, plus one Markdown fragment (``gpu.md``)
rendered from all of them after every tier, and the script's log (``gpu-check.log``): at most seven
files, flat, under the device tool's limit of eight.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from bench.common import Machine, Row

TIERS: tuple[str, ...] = ('check', 'text', 'mfu', 'image', 'quality')
TITLES = {
    'check': 'GPU, drivers and the GPU tests',
    'text': 'text training throughput, this project vs sentence-transformers (bf16)',
    'mfu': 'model FLOPs utilisation of the trainer (bf16)',
    'image': 'image training throughput, this project vs a plain timm loop (channels_last + bf16)',
    'quality': 'time to a fine-tuned model and its quality, this project vs sentence-transformers',
}
FRAGMENT = 'gpu.md'
LOG = 'gpu-check.log'
Status = Literal['running', 'ok', 'failed', 'timeout', 'skipped']


class TierResult(BaseModel):
    tier: str = Field(description='check, text, mfu, image or quality.')
    title: str
    status: Status = 'running'
    dry_run: bool = Field(description='True: tiny sizes on the CPU, a harness check that measures nothing.')
    started: str = Field(description='UTC time the tier began.')
    seconds: float = 0.0
    timeout_s: float | None = None
    rows: list[Row] = Field(default_factory=list)
    facts: dict[str, Any] = Field(default_factory=dict, description='Numbers and facts that are not table rows.')
    notes: list[str] = Field(default_factory=list)
    error: str = ''
    machine: Machine | None = None
    versions: dict[str, str] = Field(default_factory=dict)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def tier_file(out: Path, tier: str) -> Path:
    return out / f'gpu-{tier}.json'


def save(result: TierResult, out: Path) -> Path:
    """Write the tier's JSON atomically (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    path = tier_file(out, result.tier)
    partial = path.with_name(path.name + '.part')
    partial.write_text(json.dumps(result.model_dump(mode='json'), indent=1) + '\n')
    partial.replace(path)
    return path


def load(out: Path, tier: str) -> TierResult | None:
    path = tier_file(out, tier)
    if not path.exists():
        return None
    return TierResult.model_validate_json(path.read_text())


def load_all(out: Path) -> list[TierResult]:
    return [result for tier in TIERS if (result := load(out, tier)) is not None]
