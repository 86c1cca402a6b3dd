"""A training run's live log: dvclive metrics and plots, and an nnU-Net style ``progress.png``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ray.train
from matplotlib.figure import Figure
from ray.train import UserCallback

from uml.train.checkpoints import SCORE_KEY, read_history


class LiveLogger(UserCallback):
    """Rewrites the live log after every report that carries a checkpoint.

    Ray Train runs callbacks in its controller, which it places on the node of the driver, so
    the files land where ``dvc repro`` runs, whichever node holds rank 0. Each report rewrites
    the log from the checkpoint's full history, so a resumed run still has every epoch.
    """

    def __init__(self, out_dir: Path, params_to_log: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.params_to_log = params_to_log

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None:
            return
        write_live_log(self.out_dir, read_history(checkpoint), self.params_to_log)


def write_live_log(out_dir: Path, history: list[dict[str, float]], params_to_log: dict[str, Any]) -> None:
    """(Re)write dvclive's metrics/plots and ``progress.png`` from the per-epoch history."""
    from dvclive import Live

    out_dir.mkdir(parents=True, exist_ok=True)
    with Live(dir=str(out_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None) as live:
        live.log_params(params_to_log)
        for row in history:
            live.step = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):
                    live.log_metric(key, value, plot=True)
            live.next_step()
    plot_progress(history, out_dir / "progress.png")


def plot_progress(history: list[dict[str, float]], path: Path) -> None:
    """Losses, validation task metrics, and validation calibration and uncertainty metrics against
    the epoch, best epoch marked.

    A ``matplotlib.figure.Figure`` of its own, never pyplot (as :mod:`uml.plots`): no backend
    switch or figure registry shared with the rest of the process."""
    epochs = [int(r["epoch"]) + 1 for r in history]  # 1-based, as the progress lines
    fig = Figure(figsize=(16, 4.5))
    ax_loss, ax_val, ax_unc = fig.subplots(1, 3)
    for key, style in (("train/loss", "-"), ("train/loss_cls", "--"), ("train/loss_seg", "--"), ("train/loss_mut", ":")):
        if key in history[0]:
            ax_loss.plot(epochs, [r[key] for r in history], style, label=key.removeprefix("train/"))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_loss.legend()
    for key in sorted(history[0]):
        if not key.startswith("val/") or key == SCORE_KEY:
            continue
        name = key.removeprefix("val/")
        calibration = name.startswith(("unc/", "raw/")) or name in ("cls/nll", "cls/brier", "cls/ece")
        (ax_unc if calibration else ax_val).plot(epochs, [r[key] for r in history], label=name)
    ax_unc.set(xlabel="epoch", ylabel="value", title="Validation: calibration and uncertainty")
    ax_unc.set_ylim(bottom=0)
    ax_unc.legend(fontsize="x-small", ncol=2)
    scores = [r.get(SCORE_KEY, float("nan")) for r in history]
    ax_val.plot(epochs, scores, "k-", linewidth=2, label="score")
    if any(not math.isnan(s) for s in scores):
        best = max(range(len(scores)), key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])
        ax_val.axvline(epochs[best], color="grey", linestyle=":", label=f"best (epoch {epochs[best]})")
    ax_val.set(xlabel="epoch", ylabel="value", title="Validation", ylim=(0, 1.02))
    ax_val.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
