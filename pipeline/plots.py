"""The report's figures: the task's metric against measured speedup, and what each member keeps per layer.

Shared by `ziplm run` (report.md) and the benchmarks, so a family and a benchmark are drawn the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402

Point = tuple[float, float]  # (measured speedup, metric value)


@dataclass(frozen=True)
class KeptStructure:
    """One model's kept attention heads and FFN width per layer."""

    name: str
    heads: Sequence[int]
    ffn: Sequence[int]


def metric_vs_speedup(path: Path, series: Mapping[str, Sequence[Point]], dense_value: float, metric: str,
                      title: str) -> Path:
    """One line per method through its (measured speedup, metric value) points, the dense model at 1x."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        ordered = sorted(points)
        axes.plot([p[0] for p in ordered], [p[1] for p in ordered], marker="o", label=label)
    axes.axhline(dense_value, color="grey", linestyle="--", linewidth=1, label=f"dense {dense_value:.3f}")
    axes.set(xlabel="measured speedup over dense (x)", ylabel=metric, title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def kept_per_layer(path: Path, models: Sequence[KeptStructure], dense: KeptStructure) -> Path:
    """Kept heads (top) and FFN width (bottom) per layer, one bar per model, dense drawn as the outline."""
    figure, (heads_axes, ffn_axes) = plt.subplots(2, 1, figsize=(7.0, 5.6), sharex=True)
    layers = range(len(dense.heads))
    width = 0.8 / max(len(models), 1)
    for axes, attribute, label in ((heads_axes, "heads", "kept heads"), (ffn_axes, "ffn", "FFN width")):
        axes.bar(layers, getattr(dense, attribute), width=0.9, fill=False, edgecolor="grey", label=dense.name)
        for index, model in enumerate(models):
            offsets = [layer - 0.4 + width * (index + 0.5) for layer in layers]
            axes.bar(offsets, getattr(model, attribute), width=width, label=model.name)
        axes.set_ylabel(label)
        axes.grid(axis="y", alpha=0.3)
    ffn_axes.set_xlabel("layer")
    ffn_axes.set_xticks(list(layers))
    heads_axes.legend(fontsize=7, ncol=2)
    heads_axes.set_title("what each member keeps per layer")
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # renamed when complete: no half-written figure
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)
    return path
