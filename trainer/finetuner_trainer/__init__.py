"""The trainer that runs in the GPU pod (and as a subprocess on the local backend).

``main(argv) -> exit code`` is the program; ``train(config) -> TrainResult`` runs in-process.
Heavy imports (torch, transformers) happen inside, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetuner.api.v1alpha1 import TrainerConfig
    from finetuner_trainer.runner import TrainResult

__all__ = ['main', 'train']


def main(argv: list[str] | None = None) -> int:
    from finetuner_trainer.runner import main as run_main

    return run_main(argv)


def train(config: TrainerConfig, log: Any = None) -> TrainResult:
    from finetuner_trainer.runner import train as run_train

    return run_train(config, log)
