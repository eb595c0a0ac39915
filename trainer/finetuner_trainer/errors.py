"""The trainer's one user-facing error type.

A :class:`ConfigError` is a mistake in the run's configuration or data (unknown model, a loss
that does not fit the data, an empty file, a corrupt image). The trainer exits with
``EXIT_CONFIG_ERROR`` on it and the Job is not retried. Anything else is an infrastructure
failure and is retried.

The field is named as the FinetuneRun writes it, ``spec.batchSize``, ``spec.trainData[3]`` (records counted
from 0, as the SDK counts ``train_data[3]``): that is what a person who applied the custom resource reads. The
SDK rewrites the same path in its own words (``batch_size``, ``train_data[3]``) for whoever called ``fit()``
(:func:`finetuner.wording.for_sdk`).
"""

from __future__ import annotations

import re

from finetuner.api.v1alpha1 import FinetuneRunSpec

# The spec's fields as the custom resource names them (camelCase), the first part of a field path.
SPEC_FIELDS = frozenset(info.alias or name for name, info in FinetuneRunSpec.model_fields.items())


def spec_path(field: str) -> str:
    """``spec.<field>`` for a field of the FinetuneRun's spec, the field as it is otherwise."""
    first = re.split(r'[.\[]', field, maxsplit=1)[0]
    return f'spec.{field}' if first in SPEC_FIELDS else field


class ConfigError(Exception):
    """A configuration or data error, with the field (camelCase, as the user wrote it) it concerns."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f'{spec_path(field)}: {problem}')

    def one_line(self) -> str:
        """The message as a single line (the termination log and the run's status hold one line)."""
        return ' '.join(str(self).split())
