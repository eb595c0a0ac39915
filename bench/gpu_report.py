"""The GPU results as Markdown: the fragment a run leaves in its output folder (``gpu.md``), and the
"GPU" section of ``docs/BENCHMARKS.md``.

After a device run, publish what came back with::

    python -m bench.gpu_report --from DIR     # DIR: the run's output folder (gpu-*.json)

which copies the tier files into ``bench/results/gpu/`` and rewrites the GPU section of
``docs/BENCHMARKS.md`` between its markers (``python -m bench`` keeps that section when it rewrites the
rest of the file). Until a GPU run has been published, the section says that none has happened.
Results of a ``--dry-run`` (CPU, tiny models) are refused: they measure nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.gpu_results import FRAGMENT, TIERS, TierResult, load_all, tier_file

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / 'bench' / 'results' / 'gpu'
BEGIN = '<!-- gpu-section:begin (python -m bench.gpu_report --from DIR writes this section) -->'
END = '<!-- gpu-section:end -->'
COLUMNS = ('measure', 'this project', 'reference', 'ratio', 'target', 'met')
NO_RUN = (
    '**No GPU run has happened yet.** Every number above was measured on CPUs. `scripts/gpu-check.sh` runs '
    'the GPU tests and `python -m bench --gpu` on a CUDA machine in one command and writes its results as '
    'files; `python -m bench.gpu_report --from DIR` then publishes them here. Its dry run (the same code '
    'on the CPU with tiny models) is part of the default test suite (`tests/bench/test_gpu_check.py`).'
)


def _number(value: float | None, unit: str = '') -> str:
    if value is None:
        return '–'
    text = f'{value:.4g}' if abs(value) < 1000 else f'{value:,.0f}'
    return f'{text} {unit}'.strip()


def _cell(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')


def _met(row: Any) -> str:
    if row.met is None:
        return 'not measured' if row.note.startswith('not measured') else '–'
    return 'yes' if row.met else '**MISSED**'


def _machine_lines(results: list[TierResult]) -> list[str]:
    check = next((r for r in results if r.tier == 'check'), None)
    first = next((r for r in results if r.machine is not None), None)
    lines = []
    if check is not None:
        torch_facts = check.facts.get('torch', {})
        smi = check.facts.get('nvidia_smi', {})
        lines.append(
            f'- GPU: {torch_facts.get("device", "none")} (compute capability {torch_facts.get("capability", "?")}, '
            f'{torch_facts.get("multiprocessors", "?")} SMs, {torch_facts.get("memory_gib", "?")} GiB); torch '
            f'{torch_facts.get("torch", "?")}, CUDA {torch_facts.get("cuda_runtime", "?")}, cuDNN '
            f'{torch_facts.get("cudnn", "?")}, NCCL {torch_facts.get("nccl", "?")}; ONNX Runtime providers: '
            f'{torch_facts.get("onnxruntime_providers", "?")}'
        )
        if smi.get('query'):
            lines.append('- nvidia-smi: ' + ' / '.join(smi['query'].splitlines()))
        ceilings = check.facts.get('ceilings')
        if ceilings:
            lines.append(
                f'- Measured ceilings: bf16 matrix multiply {ceilings["matmul_bf16_tflops"]} TFLOP/s '
                f'({ceilings["matmul_size"]}^3), device copy {ceilings["copy_gb_per_s"]} GB/s ({ceilings["method"]})'
            )
    if first is not None and first.machine is not None:
        m = first.machine
        lines.append(f'- CPU: {m.cpu}, {m.cores} cores; Python {m.python} on {m.platform}')
        lines.append('- ' + ', '.join(f'{k} {v}' for k, v in first.versions.items()))
    return lines


def render_body(results: list[TierResult]) -> list[str]:
    """The tiers' status, the table of every row, notes and other numbers (no heading)."""
    lines = []
    if any(r.dry_run for r in results):
        lines += ['**Dry run**: tiny models on the CPU; a harness check, not a measurement.', '']
    lines.append('| tier | status | seconds | timeout |')
    lines.append('|---|---|---|---|')
    for result in results:
        timeout = f'{result.timeout_s:.0f}' if result.timeout_s else '–'
        lines.append(f'| {result.tier}: {result.title} | {result.status} | {result.seconds:.0f} | {timeout} |')
    lines += ['', '| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    rows = [row for result in results for row in result.rows]
    for row in rows:
        reference = _number(row.reference, row.unit) + (f' ({row.reference_name})' if row.reference_name else '')
        ratio = f'{row.ratio:.2f}x' if row.ratio is not None else '–'
        cells = [row.measure, _number(row.ours, row.unit), reference, ratio, row.target or '–', _met(row)]
        lines.append('| ' + ' | '.join(_cell(c) for c in cells) + ' |')
    notes = [f'- **{row.measure}**: {row.note}' for row in rows if row.note]
    notes += [f'- {result.tier}: {note}' for result in results for note in result.notes]
    notes += [f'- {result.tier} {result.status}: {_cell(result.error[:800])}' for result in results if result.error]
    for result in results:
        if result.tier == 'mfu' and result.facts.get('formula'):
            notes.append(f'- MFU: {result.facts["formula"]}.')
    if notes:
        lines += ['', '### Notes', '', *notes]
    extras = [row for row in rows if row.extra]
    if extras:
        lines += ['', '### Other numbers', '']
        for row in extras:
            details = ', '.join(f'{k} = {_number(v) if isinstance(v, float) else v}' for k, v in row.extra.items())
            lines.append(f'- {row.measure}: {details}')
    machine = _machine_lines(results)
    if machine:
        lines += ['', '### Machine', '', *machine]
    return lines


def render_fragment(results: list[TierResult]) -> str:
    return '\n'.join(['## GPU', '', *render_body(results), '']) + '\n'


def write_fragment(out: Path) -> Path:
    path = out / FRAGMENT
    path.write_text(render_fragment(load_all(out)))
    return path


def summary_lines(out: Path) -> list[str]:
    """A short summary for the end of the log (the device tool returns the last lines of output)."""
    lines = ['[gpu] summary:']
    for result in load_all(out):
        lines.append(f'[gpu]   {result.tier}: {result.status} ({result.seconds:.0f} s)')
        for row in result.rows:
            value = f'{row.ratio:.2f}x' if row.ratio is not None else _number(row.ours, row.unit)
            lines.append(f'[gpu]     {_met(row):>12}  {value:>14}  {row.measure[:110]}')
    return lines


def gpu_section(published: Path = PUBLISHED) -> str:
    """The GPU section of docs/BENCHMARKS.md, markers included: the published run, or the plain fact
    that no GPU run has happened yet."""
    results = load_all(published) if published.is_dir() else []
    if not results:
        body = [NO_RUN]
    else:
        started = min(r.started for r in results)
        body = [
            f'Measured by `scripts/gpu-check.sh` (`python -m bench --gpu`) on {started}; raw results in '
            '`bench/results/gpu/`. Ratios are this project / reference (higher is better, except where a row '
            'says lower is better).',
            '',
            *render_body(results),
        ]
    return '\n'.join([BEGIN, '## GPU', '', *body, END]) + '\n'


def replace_section(document: str, section: str) -> str:
    """``document`` with its GPU section replaced by ``section`` (appended when it has none)."""
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip('\n')
        return head + section + ('\n' + tail if tail else '')
    return document.rstrip('\n') + '\n\n' + section


def publish(source: Path, doc: Path, published: Path = PUBLISHED, allow_dry_run: bool = False) -> list[Path]:
    """Copy a run's tier files into ``published`` and rewrite the GPU section of ``doc``."""
    results = load_all(source)
    if not results:
        raise SystemExit(f'{source} holds no gpu-<tier>.json file ({", ".join(TIERS)}): nothing to publish')
    if any(r.dry_run for r in results) and not allow_dry_run:
        raise SystemExit(
            f'{source} holds dry-run results (tiny models on the CPU): they measure nothing; '
            'publish the files of a GPU run'
        )
    published.mkdir(parents=True, exist_ok=True)
    for stale in published.glob('gpu-*.json'):
        stale.unlink()
    copied = []
    for result in results:
        target = tier_file(published, result.tier)
        shutil.copyfile(tier_file(source, result.tier), target)
        copied.append(target)
    text = doc.read_text() if doc.exists() else '# Benchmarks\n'
    doc.write_text(replace_section(text, gpu_section(published)))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m bench.gpu_report', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--from', dest='source', type=Path, required=True, help="a GPU run's output folder")
    parser.add_argument('--doc', type=Path, default=ROOT / 'docs' / 'BENCHMARKS.md', help='the document to update')
    parser.add_argument('--published', type=Path, default=PUBLISHED, help='where the tier files are kept')
    parser.add_argument('--allow-dry-run', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    copied = publish(args.source, args.doc, args.published, args.allow_dry_run)
    print(
        f'published {len(copied)} tier files into {args.published} and the GPU section of {args.doc}', file=sys.stderr
    )
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
