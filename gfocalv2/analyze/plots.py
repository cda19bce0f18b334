"""The plots of the analysis, each a PNG with the models side by side (matplotlib's object API
and its Agg canvas: no pyplot, no global backend change).

Every function takes ``models``, a list of ``(label, result)`` pairs, where ``result`` is the
dict :func:`gfocalv2.analyze.cli.analyze_results` builds for one results file, and the path to
write; it returns the path.
"""

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import ERROR_TYPES
from .quality import MIN_IOU

__all__ = [
    "PLOTS",
    "plot_score_vs_iou",
    "plot_reliability",
    "plot_pr_curves",
    "plot_ap_per_class",
    "plot_errors",
    "write_plots",
]

DPI = 100
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _figure(num_panels, width=4.2, height=3.8):
    fig = Figure(figsize=(width * num_panels, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, num_panels, squeeze=False)[0]
    return fig, axes


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _fmt(v):
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def plot_score_vs_iou(models, path):
    """Score against best IoU of the detections with IoU >= 0.5 (hexbin, log counts), the
    least-squares line, Pearson / Spearman / count in the title."""
    fig, axes = _figure(len(models))
    for ax, (label, r) in zip(axes, models):
        keep = r["iou"] >= MIN_IOU
        x, y = r["iou"][keep], r["score"][keep]
        if len(x):  # a log colour scale has no range without any detection
            hb = ax.hexbin(
                x, y, gridsize=30, extent=(MIN_IOU, 1, 0, 1), bins="log", cmap="viridis", mincnt=1
            )
            fig.colorbar(hb, ax=ax, label="detections (log)")
        else:
            ax.text(0.75, 0.5, f"no detection with IoU >= {MIN_IOU}", ha="center", fontsize=9)
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            line = np.array([MIN_IOU, 1.0])
            ax.plot(line, slope * line + intercept, color="red", lw=2, label="least squares")
            ax.legend(loc="upper left", fontsize=8)
        q = r["quality"]
        ax.set_title(
            f"{label}: Pearson {_fmt(q['pearson'])}\nSpearman {_fmt(q['spearman'])}, "
            f"n={q['num_detections']}",
            fontsize=10,
        )
        ax.set(xlim=(MIN_IOU, 1), ylim=(0, 1), xlabel="IoU with best ground truth", ylabel="score")
    return _save(fig, path)


def plot_reliability(models, path):
    """Mean best IoU per score bin (every detection), the count of each bin written on it, and
    the diagonal where the score would equal the IoU."""
    fig, axes = _figure(len(models))
    for ax, (label, r) in zip(axes, models):
        b = r["reliability"]
        edges, mean, count = b["edges"], b["mean_iou"], b["count"]
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        ax.bar(
            centers,
            np.nan_to_num(mean),
            width=width * 0.9,
            color=COLORS[0],
            alpha=0.8,
            label="mean IoU",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="IoU = score")
        for c, m, n in zip(centers, np.nan_to_num(mean), count):
            ax.text(c, m + 0.01, str(n), ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set(
            xlim=(0, 1), ylim=(0, 1.15), xlabel="score", ylabel="mean IoU with best ground truth"
        )
        ax.set_title(f"{label}: reliability (detections per bin on the bars)", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_pr_curves(models, path):
    """Precision-recall at IoU 0.5 and 0.75 (COCOeval, averaged over the classes)."""
    fig, axes = _figure(len(models))
    for ax, (label, r) in zip(axes, models):
        e = r["coco"]
        for (t, p), color in zip(sorted(e["precision"].items()), COLORS):
            ap = e["ap50"] if t == 0.5 else e["ap75"]
            ax.plot(e["recall"], p, color=color, lw=2, label=f"IoU {t} (AP {ap:.1f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(f"{label}: precision-recall", fontsize=10)
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _grouped_bars(ax, names, values, labels):
    """Bars of ``values`` (models, groups) grouped by ``names``, one color per model."""
    x = np.arange(len(names))
    width = 0.8 / max(len(labels), 1)
    for k, (label, v) in enumerate(zip(labels, values)):
        ax.bar(
            x + (k - (len(labels) - 1) / 2) * width,
            np.nan_to_num(v),
            width,
            label=label,
            color=COLORS[k % len(COLORS)],
        )
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90 if len(names) > 12 else 0, fontsize=8)
    top = np.nanmax(np.asarray(values, dtype=np.float64), initial=0.0)
    ax.set_ylim(0, 1.25 * top if top > 0 else 1)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper right", ncol=len(labels))
    ax.grid(axis="y", alpha=0.3)


def plot_ap_per_class(models, path, class_names):
    """AP (0-100, IoU 0.5:0.95) of every class, the models' bars side by side."""
    fig, axes = _figure(1, width=max(6.0, 0.25 * len(class_names) * len(models) + 2), height=4)
    _grouped_bars(
        axes[0], class_names, [r["coco"]["ap_per_class"] for _, r in models], [m for m, _ in models]
    )
    axes[0].set(ylabel="AP", title="AP per class")
    return _save(fig, path)


def plot_errors(models, path):
    """AP50 lost to each of TIDE's error types (dAP), the models' bars side by side, the number
    of errors of each type above the bars."""
    fig, axes = _figure(1, width=7, height=4)
    ax = axes[0]
    _grouped_bars(
        ax,
        ERROR_TYPES,
        [[r["errors"]["dap"][t] for t in ERROR_TYPES] for _, r in models],
        [m for m, _ in models],
    )
    width = 0.8 / len(models)
    for k, (_, r) in enumerate(models):
        for x, t in enumerate(ERROR_TYPES):
            ax.text(
                x + (k - (len(models) - 1) / 2) * width,
                r["errors"]["dap"][t],
                str(r["errors"]["count"][t]),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set(ylabel="dAP50 (AP points gained by fixing)", title="Errors (TIDE), count above bars")
    return _save(fig, path)


#: File name of each plot in the output folder.
PLOTS = {
    "score_vs_iou": "score_vs_iou.png",
    "reliability": "reliability.png",
    "pr_curves": "pr_curves.png",
    "ap_per_class": "ap_per_class.png",
    "errors": "errors.png",
}


def write_plots(models, output_dir, class_names):
    """Every plot of :data:`PLOTS` in ``output_dir``; returns ``{name: path}``."""
    path = {k: os.path.join(output_dir, v) for k, v in PLOTS.items()}
    plot_score_vs_iou(models, path["score_vs_iou"])
    plot_reliability(models, path["reliability"])
    plot_pr_curves(models, path["pr_curves"])
    plot_ap_per_class(models, path["ap_per_class"], class_names)
    plot_errors(models, path["errors"])
    return path
