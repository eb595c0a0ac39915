"""The typed contract shared by the SDK, the operator and the trainer."""

from finetuner.api.reasons import Reason
from finetuner.api.v1alpha1 import (
    API_VERSION,
    EXIT_CONFIG_ERROR,
    GROUP,
    VERSION,
    Experiment,
    ExperimentSpec,
    ExperimentStatus,
    FinetuneRun,
    FinetuneRunSpec,
    FinetuneRunStatus,
    Phase,
    Progress,
    TrainerConfig,
)

__all__ = [
    'API_VERSION',
    'EXIT_CONFIG_ERROR',
    'GROUP',
    'VERSION',
    'Experiment',
    'ExperimentSpec',
    'ExperimentStatus',
    'FinetuneRun',
    'FinetuneRunSpec',
    'FinetuneRunStatus',
    'Phase',
    'Progress',
    'Reason',
    'TrainerConfig',
]
