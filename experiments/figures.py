"""The experiments' figures share one look: test accuracy on the y axis, a light grid, a legend when there are
lines, a 6 × 4 inch PNG at 120 dpi, drawn without a display."""

from __future__ import annotations

from pathlib import Path


def accuracy_axes():
    """``(fig, ax)`` of a new figure, drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))


def save(fig, ax, path: Path, xlabel: str, title: str, legend_outside: bool = False) -> None:
    """Label, finish and write ``fig`` to ``path``, then free it; ``legend_outside``: the legend right of the axes
    (for many lines), the figure widened to hold it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        if legend_outside:
            fig.set_size_inches(9, 4)
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
