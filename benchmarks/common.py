"""Helpers the benchmark tables share: mean ± sd of per-seed values, a row of curve panels, and
publishing a results file."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence


def mean_sd(xs: Sequence[float], scale: float = 100) -> str:
    """"mean ± sd" of ``xs * scale`` (scale 100: fractions as percent); one value alone, "-" for none."""
    if len(xs) < 2:
        return f"{xs[0] * scale:.2f}" if xs else "-"
    return f"{statistics.mean(xs) * scale:.2f} ± {statistics.stdev(xs) * scale:.2f}"


def save_curve_panels(path: Path, panels: Sequence[tuple[str, Sequence[tuple[str, str, Sequence]]]],
                      vlines: Sequence[float | None] = ()) -> None:
    """One panel per (title, [(label, line style, [(step, accuracy), ...]), ...]), side by side,
    sharing the accuracy axis; ``vlines[i]`` marks a step in panel i (e.g. where intervention ends)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for i, (ax, (title, lines)) in enumerate(zip(axes[0], panels)):
        for label, style, curve in lines:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], style, label=label)
        if i < len(vlines) and vlines[i] is not None:
            ax.axvline(vlines[i], color="grey", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(text: str, out: Path) -> None:
    """Print a benchmark's markdown and write it to its results file (atomically: an interrupted
    run never leaves half a table behind)."""
    from edgeprep.fsutil import write_text_atomic

    print(text)
    write_text_atomic(out, text)
