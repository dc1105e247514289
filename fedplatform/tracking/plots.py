"""Figures for runs and datasets, drawn with matplotlib's Agg canvas (no display, no pyplot
global state, safe in Ray workers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_partition(describe: dict, path: str | Path) -> Path:
    """Client x class heatmap of training samples from `FederatedDataset.describe()`.

    Classes run head -> tail (descending global train count); the colour scale is logarithmic
    so that tail classes stay visible next to the head; empty cells are left blank.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    counts = np.array([c["class_counts"] for c in describe["clients"]], dtype=np.int64)
    order = np.argsort(-np.asarray(describe["train_class_counts"]), kind="stable")
    counts = counts[:, order]
    names = [describe["class_names"][i] for i in order]
    num_clients, num_classes = counts.shape

    fig = Figure(figsize=(min(max(6.0, 0.3 * num_classes + 2.5), 24.0), min(max(3.5, 0.28 * num_clients + 1.5), 20.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_equal(counts, 0), aspect="auto", interpolation="nearest", cmap="viridis",
                      norm=LogNorm(vmin=1, vmax=max(int(counts.max()), 2)))
    fig.colorbar(image, ax=ax, label="training samples")
    ax.set_ylabel("client")
    if num_classes <= 30:
        ax.set_xlabel("class (head \u2192 tail)")
        ax.set_xticks(range(num_classes), names, rotation=60, ha="right", fontsize=8)
    else:
        ax.set_xlabel("class rank by training samples (head \u2192 tail)")
    ax.set_yticks(range(num_clients), [str(c["id"]) for c in describe["clients"]],
                  fontsize=8 if num_clients <= 40 else 5)
    total = int(counts.sum())
    ax.set_title(f"{describe['dataset']}: {total:,} training samples over {num_clients} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)



def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy_curve(history: list[dict], path: str | Path) -> Path:
    """Test accuracy per evaluated round, with many/medium/few-shot accuracy where present."""
    fig = _figure((6.0, 4.0))
    ax = fig.add_subplot()
    for key, label in (("accuracy", "overall"), ("many_shot_acc", "many-shot"),
                       ("medium_shot_acc", "medium-shot"), ("few_shot_acc", "few-shot")):
        points = [(h["round"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label,
                    linewidth=2 if key == "accuracy" else 1)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_per_class_accuracy(per_class: list[float], train_counts, class_names: list[str],
                            path: str | Path) -> Path:
    """Per-class test accuracy (bars) with classes ordered head to tail by training count (line)."""
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    acc = np.asarray(per_class, dtype=float)[order]
    fig = _figure((max(6.0, min(0.12 * len(order), 24.0)), 4.0))
    ax = fig.add_subplot()
    ax.bar(range(len(order)), np.nan_to_num(acc), color="tab:blue")
    counts_ax = ax.twinx()
    counts_ax.plot(range(len(order)), np.asarray(train_counts)[order], color="tab:orange")
    counts_ax.set_yscale("log")
    counts_ax.set_ylabel("train samples (log)", color="tab:orange")
    if len(order) <= 20:
        ax.set_xticks(range(len(order)), [class_names[i] for i in order], rotation=45, ha="right")
    ax.set_xlabel("class (head to tail)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_sweep_metric(rows: list[dict], key: str, metric: str, path: str | Path) -> Path:
    """Sweep comparison: `metric` of each trial against the swept `key`, one series per algorithm."""
    fig = _figure((6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for algorithm in sorted({r["algorithm"] for r in rows}):
        pts = sorted((r[key], r[metric]) for r in rows if r["algorithm"] == algorithm
                     and r.get(key) is not None and r.get(metric) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algorithm)
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if values and min(values) > 0 and max(values) / min(values) >= 20:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"final {metric} vs {key}")
    ax.grid(alpha=0.3)
    if ax.lines:  # no finished trial, no series (and no legend to draw)
        ax.legend(title="algorithm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_sweep_groups(rows: list[dict], metrics: tuple[str, ...], path: str | Path) -> Path:
    """Grouped bars: one group per trial, one bar per metric (e.g. many / medium / few-shot accuracy)."""
    fig = _figure((max(6, 0.6 * len(rows) * len(metrics)), 4))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        ax.bar([i + j * width for i in range(len(rows))], [r.get(metric) or 0.0 for r in rows], width,
               label=metric)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([str(r["trial"]) for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
