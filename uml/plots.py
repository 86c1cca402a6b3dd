"""Plot data files and matplotlib figures of the evaluation and of ``uml predict``.

Curves are written twice: as CSV data files that ``dvc plots show`` renders (one row per point,
a header naming the columns) and as PNG figures for people without DVC. Figures use
``matplotlib.figure.Figure`` directly, never pyplot, so no GUI backend or global state is involved.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from uml import metrics

# One color per evaluated structure (disc, cup, ...), in metrics.structures() order.
STRUCTURE_COLORS = ("#2ca02c", "#1f77b4", "#d62728", "#9467bd", "#ff7f0e", "#8c564b")


def _cell(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(float(value)) else repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows (dicts with the same keys) as CSV; non-finite numbers become empty cells."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def roc_figure(path: str | Path, fpr: np.ndarray, tpr: np.ndarray, auc_value: float, title: str = "ROC") -> Path:
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"AUC = {auc_value:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def reliability_figure(path: str | Path, stats: Mapping[str, np.ndarray], ece_value: float) -> Path:
    """Bars of per-bin accuracy against the diagonal, with the bin counts below."""
    fig = Figure(figsize=(4.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = stats["upper"] - stats["lower"]
    filled = stats["count"] > 0
    top.bar(stats["lower"][filled], stats["accuracy"][filled], width=width[filled], align="edge",
            edgecolor="black", alpha=0.7, label="accuracy")
    top.plot(stats["confidence"][filled], stats["accuracy"][filled], "o", color="black", markersize=3,
             label="(mean confidence, accuracy)")
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    top.set(ylabel="accuracy", ylim=(0, 1.02), title=f"reliability (ECE = {ece_value:.3f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(stats["lower"], stats["count"], width=width, align="edge", edgecolor="black", color="grey")
    bottom.set(xlabel="predicted-class confidence", ylabel="images", xlim=(0, 1))
    return _save(fig, path)


def reliability_comparison_figure(path: str | Path, diagrams: Mapping[str, tuple[Mapping[str, np.ndarray], float]],
                                  title: str) -> Path:
    """Per-bin accuracy against mean confidence of several class outputs (name -> (the
    :func:`uml.metrics.reliability_diagram` statistics, ECE)) on one chart, with the diagonal."""
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for name, (stats, ece_value) in diagrams.items():
        filled = stats["count"] > 0
        ax.plot(stats["confidence"][filled], stats["accuracy"][filled], marker="o", markersize=4,
                label=f"{name} (ECE {ece_value:.3f})")
    ax.set(xlabel="mean predicted-class confidence in the bin", ylabel="accuracy in the bin", xlim=(0, 1), ylim=(0, 1.02),
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def risk_coverage_figure(path: str | Path, curves: Mapping[str, Mapping[str, np.ndarray]], target: float | None,
                         chosen: tuple[float, float] | None) -> Path:
    """Selective risk (errors among accepted cases) against coverage, one line per confidence
    score (name -> :func:`uml.metrics.risk_coverage_curve`), the promised risk as a line and the
    referral rule's operating point on this data as a marker."""
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    for name, curve in curves.items():
        ax.step(curve["coverage"], curve["risk"], where="post", label=name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"promised risk {target:g}")
    if chosen is not None:
        ax.plot(*chosen, "o", color="black", label=f"referral rule: coverage {chosen[0]:.2f}, risk {chosen[1]:.3f}")
    ax.set(xlabel="coverage (fraction of cases accepted)", ylabel="error rate among accepted cases", xlim=(0, 1),
           ylim=(0, None), title="risk-coverage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def vcdr_figure(path: str | Path, predicted: np.ndarray, truth: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                halfwidths: np.ndarray | None, coverage: float | None) -> Path:
    """Predicted against true vertical cup-to-disc ratio per image, coloured by label, with each
    image's conformal interval (``halfwidths``) as an error bar."""
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for k, name in enumerate(class_names):
        chosen = (labels == k) & np.isfinite(predicted) & np.isfinite(truth)
        if not chosen.any():
            continue
        bars = np.nan_to_num(halfwidths[chosen]) if halfwidths is not None else None
        ax.errorbar(truth[chosen], predicted[chosen], yerr=bars, fmt="o", markersize=3, alpha=0.6, elinewidth=0.5, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    interval = f", intervals at {100 * coverage:g} %" if halfwidths is not None and coverage else ""
    ax.set(xlabel="true vCDR", ylabel="predicted vCDR", xlim=(0, 1), ylim=(0, 1), title=f"vertical cup-to-disc ratio{interval}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def referral_figure(path: str | Path, curve: Mapping[str, np.ndarray]) -> Path:
    fig = Figure(figsize=(4.5, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(curve["fraction"], curve["accuracy"], marker="o", markersize=3)
    ax.set(xlabel="fraction referred (most uncertain first)", ylabel="accuracy on retained images",
           title="uncertainty-based referral", xlim=(0, 1))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def robustness_figure(path: str | Path, tables: Mapping[str, Sequence[Mapping[str, float]]], x_labels: Mapping[str, str]) -> Path:
    """One column per noise kind: task metrics on top, mean uncertainties below, against noise level."""
    kinds = list(tables)
    fig = Figure(figsize=(5 * len(kinds), 7), layout="constrained")
    axes = fig.subplots(2, len(kinds), squeeze=False)
    for col, kind in enumerate(kinds):
        rows = tables[kind]
        level = [r["level"] for r in rows]
        for key in rows[0]:
            if key == "level":
                continue
            ax = axes[1, col] if key.startswith("unc_") else axes[0, col]
            ax.plot(level, [r[key] for r in rows], marker="o", markersize=3, label=key)
        axes[0, col].set(title=kind, ylabel="metric", ylim=(0, 1.02))
        axes[1, col].set(xlabel=x_labels.get(kind, "level"), ylabel="mean uncertainty")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    return _save(fig, path)


def draw_mask_overlay(ax: Any, mask: np.ndarray, mask_classes: Sequence[str], extent: tuple | None = None, alpha: float = 0.35) -> None:
    """Translucent fill and a contour line per evaluated structure of a label mask."""
    for i, (name, select) in enumerate(metrics.structures(mask_classes).items()):
        binary = select(mask)
        if not binary.any():
            continue
        color = STRUCTURE_COLORS[i % len(STRUCTURE_COLORS)]
        layer = np.zeros(binary.shape + (4,), dtype=np.float32)
        layer[binary] = to_rgba(color, alpha)
        ax.imshow(layer, extent=extent, interpolation="nearest")
        # origin="upper" + extent places Z[0, 0] at the top-left pixel centre, as imshow does.
        ax.contour(binary.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.2,
                   origin="upper", extent=extent)


def panel_figure(
    path: str | Path,
    image: np.ndarray,
    gt_mask: np.ndarray,
    pred_mask: np.ndarray | None,
    maps: Mapping[str, np.ndarray],
    mask_classes: Sequence[str],
    title: str,
) -> Path:
    """One test case: image, ground truth, prediction and one heat map per pixel-uncertainty map
    (title -> (S, S) map in [0, 1]), for what exists."""
    columns: list[tuple[str, np.ndarray | None, np.ndarray | None]] = [("image", None, None), ("ground truth", gt_mask, None)]
    if pred_mask is not None:
        columns.append(("prediction", pred_mask, None))
    columns += [(name, None, values) for name, values in maps.items()]
    fig = Figure(figsize=(3.2 * len(columns), 3.8), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, (name, mask, heat_map) in zip(axes, columns):
        ax.imshow(image)
        if mask is not None:
            draw_mask_overlay(ax, mask, mask_classes)
        if heat_map is not None:
            heat = ax.imshow(heat_map, cmap="magma", vmin=0.0, vmax=1.0, alpha=0.75)
            fig.colorbar(heat, ax=ax, shrink=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def overlay_figure(
    out: str | Path | IO[bytes],
    image: np.ndarray,
    mask: np.ndarray | None,
    uncertainty: np.ndarray | None,
    mask_classes: Sequence[str],
    title: str,
) -> None:
    """The ``uml predict`` overlay as PNG (to a path or a binary stream): ``image`` with translucent
    structure masks, contours and a legend, and the pixel-uncertainty heat map beside it when
    given. ``mask`` and ``uncertainty`` may be at a lower (model) resolution than ``image``: they are
    stretched over it."""
    panels = 2 if uncertainty is not None else 1
    fig = Figure(figsize=(5 * panels, 5.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    axes[0].imshow(image)
    axes[0].set_title("prediction")
    if mask is not None:
        draw_mask_overlay(axes[0], mask, mask_classes, extent=extent)
        # The same colour per structure as draw_mask_overlay (metrics.structures order).
        handles = [Patch(facecolor=STRUCTURE_COLORS[i % len(STRUCTURE_COLORS)], edgecolor=STRUCTURE_COLORS[i % len(STRUCTURE_COLORS)],
                         alpha=0.6, label=name) for i, name in enumerate(metrics.structures(mask_classes))]
        axes[0].legend(handles=handles, loc="lower right", fontsize=8)
    if uncertainty is not None:
        axes[1].imshow(image)
        heat = axes[1].imshow(uncertainty, cmap="magma", vmin=0.0, vmax=1.0, alpha=0.7, extent=extent)
        axes[1].set_title("pixel uncertainty")
        fig.colorbar(heat, ax=axes[1], shrink=0.8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.savefig(out, dpi=100, format="png")
