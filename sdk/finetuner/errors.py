"""Domain errors of the SDK. API and storage failures are re-raised as these (``raise ... from e``)."""

from __future__ import annotations


class FinetunerError(Exception):
    """Base of every error the SDK raises on purpose."""


class ArgumentError(FinetunerError, ValueError):
    """A bad argument, caught before anything is uploaded or submitted. The message names it."""

    def __init__(self, argument: str, problem: str):
        self.argument = argument
        super().__init__(f'{argument}: {problem}')


class RunNotFoundError(FinetunerError, LookupError):
    def __init__(self, name: str, where: str = ''):
        self.name = name
        super().__init__(f'run {name!r} not found{f" in {where}" if where else ""}')


class ExperimentNotFoundError(FinetunerError, LookupError):
    def __init__(self, name: str, where: str = ''):
        self.name = name
        super().__init__(f'experiment {name!r} not found{f" in {where}" if where else ""}')


class RunNotFinishedError(FinetunerError):
    """The run has no artifact yet (still CREATED or STARTED)."""


class RunFailedError(FinetunerError):
    """The run ended FAILED; the message carries the reason from its status."""


class BackendError(FinetunerError):
    """The cluster or the object store could not be reached or refused a call."""
