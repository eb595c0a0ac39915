"""The training-curves plot saved with the artifact: loss and evaluation metrics per epoch (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_FILE = 'training_curves.png'
LOSS_KEYS = ('train_loss', 'val_loss')


def plot_training_curves(history: list[dict[str, Any]], path: Path | str, title: str = '') -> Path | None:
    """Draw losses (left) and retrieval metrics (right) over epochs into ``path``.

    ``history`` is the loop's ``state.history``: one dict per epoch with ``epoch``, ``train_loss``,
    ``val_loss`` and metrics. ``before`` metrics, when given as an entry with epoch 0, start the
    metric curves. Returns the path, or None when there is nothing to draw."""
    import matplotlib  # heavy: loaded only to draw the plot, once per run

    matplotlib.use('Agg')  # no display in a pod
    import matplotlib.pyplot as plt

    rows = [row for row in history if isinstance(row.get('epoch'), int)]
    if not rows:
        return None
    metric_names = sorted(
        {
            key
            for row in rows
            for key, value in row.items()
            if key not in (*LOSS_KEYS, 'epoch') and isinstance(value, (int, float)) and key not in ('mrr', 'map')
        }
    )
    columns = 2 if metric_names else 1
    figure, axes = plt.subplots(1, columns, figsize=(6 * columns, 4), squeeze=False)
    loss_axis = axes[0][0]
    for key in LOSS_KEYS:
        points = [(row['epoch'], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        if points:
            loss_axis.plot(*zip(*points, strict=True), marker='o', label=key)
    loss_axis.set_xlabel('epoch')
    loss_axis.set_ylabel('loss')
    loss_axis.set_title('loss')
    loss_axis.grid(alpha=0.3)
    if loss_axis.lines:
        loss_axis.legend()
    if metric_names:
        metric_axis = axes[0][1]
        for key in metric_names:
            points = [(row['epoch'], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
            if points:
                metric_axis.plot(*zip(*points, strict=True), marker='o', label=key)
        metric_axis.set_xlabel('epoch (0 = before fine-tuning)')
        metric_axis.set_title('evaluation')
        metric_axis.grid(alpha=0.3)
        metric_axis.legend(fontsize='small')
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
