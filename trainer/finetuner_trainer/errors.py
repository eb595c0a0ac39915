"""The trainer's one user-facing error type.

A :class:`ConfigError` is a mistake in the run's configuration or data (unknown model, a loss
that does not fit the data, an empty file, a corrupt image). The trainer exits with
``EXIT_CONFIG_ERROR`` on it and the Job is not retried. Anything else is an infrastructure
failure and is retried.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration or data error, with the field (camelCase, as the user wrote it) it concerns."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f'{field}: {problem}')

    def one_line(self) -> str:
        """The message as a single line (the termination log and the run's status hold one line)."""
        return ' '.join(str(self).split())
