"""A session's curves per peer (loss, accuracy, validation accuracy) as a PNG (``sessions plot``).

matplotlib is imported when a plot is drawn, so that no other command pays for loading it."""

from __future__ import annotations

from pathlib import Path

from swarmtrain.cli.client import Json
from swarmtrain.cli.output import short


def plot_curves(metrics: Json, session: Json, dest: Path, width_px: int = 1200, height_px: int = 400) -> None:
    """The session's curves per peer (loss, accuracy, validation accuracy) as a PNG of the given size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(1, 3, figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    try:
        for series in metrics["peers"]:
            pts = series["points"]
            label = short(series["peer_id"])
            xs = [p["epoch"] for p in pts]
            axes[0].plot(xs, [p["loss"] for p in pts], label=label)
            axes[1].plot(xs, [p["accuracy"] for p in pts], label=label)
            val = [(p["epoch"], p["val_accuracy"]) for p in pts if p["val_accuracy"] is not None]
            axes[2].plot([x for x, _ in val], [y for _, y in val], marker=".", label=label)
        for ax, title in zip(axes, ("training loss", "training accuracy", "validation accuracy"), strict=True):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize="small")
        fig.suptitle(f"session {short(session['session_id'])}: {session['strategy']}, {session['status']}")
        fig.tight_layout()
        fig.savefig(dest, dpi=dpi, format="png")
    finally:
        plt.close(fig)
