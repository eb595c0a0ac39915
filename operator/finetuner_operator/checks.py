"""What the operator refuses before it creates anything, beyond what the contract checks.

The contract (``FinetuneRunSpec``) checks every field on its own; the SDK checks its arguments
and data before submitting. A FinetuneRun written by hand (``kubectl apply``) reaches the
operator without either, so the operator checks what only it can see before any child exists:

- ``metadata.name``: the API server accepts 253 characters, but the run's children are named
  ``<run>-trainer`` / ``<run>-workers`` and must stay DNS-1123 labels (63): a longer name would
  make every Job create fail with 422 and the handler retry forever;
- data and output locations: only ``s3://`` and ``file://`` are stores the trainer can read and
  write, a URI never climbs out of its prefix with ``..``, and a bare word in ``trainData`` or
  ``evalData`` (or a synthesis run's ``synthesis.corpusData``) is a pushed dataset's name, so a DNS-1123
  label (no ``../`` into other prefixes).

Each problem names the field and the fix, as the contract's own messages do.
"""

from __future__ import annotations

from finetuner.api.v1alpha1 import FinetuneRunSpec, check_dns1123_name

STORE_SCHEMES = ('s3', 'file')


def run_problems(name: str, spec: FinetuneRunSpec) -> list[str]:
    """Problems of a run the contract accepted, each as ``<field>: <problem and fix>``."""
    problems: list[str] = []
    try:
        check_dns1123_name(name, 'metadata.name')
    except ValueError as e:
        problems.append(f'metadata.name: {str(e).removeprefix("metadata.name ")}')
    corpus = spec.synthesis.corpus_data if spec.synthesis is not None else None
    locations = (
        ('trainData', spec.train_data),
        ('evalData', spec.eval_data),
        ('synthesis.corpusData', corpus),
        ('output', spec.output),
        ('modelArtifact', spec.model_artifact),
    )
    for field, value in locations[:3]:
        # The SDK always submits data as a URI; a bare word in a CR is the name of a pushed dataset.
        if value is not None and '://' not in value and not value.startswith('/'):
            try:
                check_dns1123_name(value, 'dataset name', max_len=63)
            except ValueError as e:
                problems.append(f'spec.{field}: {e}; give a pushed dataset name or an s3:// or file:// URI')
    for field, value in locations:
        if value is None or '://' not in value:
            continue
        scheme, rest = value.split('://', 1)
        if scheme not in STORE_SCHEMES:
            problems.append(
                f'spec.{field}: {value!r} uses {scheme}://, which the trainer cannot use; give an s3:// or file:// URI'
            )
        elif '..' in rest.split('/'):
            problems.append(
                f"spec.{field}: {value!r} climbs out of its prefix with '..'; write the location without '..'"
            )
    return problems
