"""The callback protocol of the one training loop (after Hugging Face's ``TrainerCallback``).

The loop in ``finetuner_trainer.loop`` is the only place that trains. It calls these hooks on
every callback in order; a callback reads :class:`TrainState` and may only flip flags on
:class:`Control` (stop, save, evaluate) — it never owns a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from finetuner.api.callback_options import CallbackOptions

if TYPE_CHECKING:
    from finetuner_trainer.context import TrainContext


@dataclass
class TrainState:
    epoch: int = 0  # 1-based once training began
    epochs: int = 0
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    train_loss: float | None = None  # mean over the last epoch
    val_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # latest evaluation metrics
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per finished epoch
    is_world_process_zero: bool = True
    resumed_from: str | None = None  # checkpoint path when this attempt resumed


@dataclass
class Control:
    should_stop: bool = False
    should_save: bool = False  # publish the current weights as the best so far
    should_evaluate: bool = False


class Callback:
    """No-op base; override what you need. ``ctx`` is the loop's :class:`~finetuner_trainer.context.TrainContext`
    (model, optimizer, scheduler, data, config, store) so a callback can evaluate or snapshot weights."""

    # The options a run's spec may give it (finetuner_trainer.callbacks.register_callback sets them).
    Options: ClassVar[type[CallbackOptions]] = CallbackOptions
    # True when on_train_end replaces the trained weights (best epoch, WiSE-FT): the loop then measures
    # the final metrics again on what is published.
    changes_weights_at_end: ClassVar[bool] = False

    def on_train_begin(self, ctx: TrainContext, state: TrainState, control: Control) -> None: ...
    def on_epoch_begin(self, ctx: TrainContext, state: TrainState, control: Control) -> None: ...
    def on_batch_end(self, ctx: TrainContext, state: TrainState, control: Control, loss: float) -> None: ...
    def on_evaluate(
        self, ctx: TrainContext, state: TrainState, control: Control, metrics: dict[str, float]
    ) -> None: ...
    def on_epoch_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None: ...
    def on_train_end(self, ctx: TrainContext, state: TrainState, control: Control) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback (best score so far, patience left, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
