"""Statistics of the timed rounds (medians, spreads, stage shares, paired ratios) and the
printed report."""

import math
import statistics
from collections import OrderedDict
from typing import Dict, List

__all__ = ["quantile", "summarize", "format_report", "format_flops"]

_TARGETS_AND_LOSSES = ("targets", "losses forward", "targets+losses forward", "losses backward")


def quantile(values: List[float], q: float) -> float:
    """The ``q`` quantile of ``values``, interpolated linearly between order statistics."""
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize(records, ours: str, batch_size: int) -> Dict:
    """Medians, spreads, stage shares and paired ratios ours / other."""
    summary = OrderedDict()
    for name, rounds in records.items():
        totals = [t["total"] for t in rounds]
        stages = OrderedDict(
            (k, statistics.median(t[k] for t in rounds)) for k in rounds[0] if k != "total"
        )
        median = statistics.median(totals)
        entry = OrderedDict(
            median_s=median,
            min_s=min(totals),
            max_s=max(totals),
            iqr_s=quantile(totals, 0.75) - quantile(totals, 0.25),
            per_image_s=median / batch_size,
            images_per_s=batch_size / median if median > 0 else float("inf"),
            stages_s=stages,
            stage_share=OrderedDict(
                (k, statistics.median(t[k] / t["total"] for t in rounds)) for k in stages
            ),
        )
        if name != ours and ours in records:
            ratios = [a["total"] / b["total"] for a, b in zip(records[ours], rounds)]
            entry["ratio_ours_over_this"] = statistics.median(ratios)
            entry["ratio_range"] = (min(ratios), max(ratios))
        summary[name] = entry
    return summary


def format_report(summary: Dict, task: str, ours: str, header: str) -> str:
    """The table of :func:`summarize`'s statistics per model, the stage breakdown and the
    post-processing (inference) or targets+losses (train) shares, under ``header``."""
    lines = [header]
    rate = "images/s" if task != "inference" else "fps"
    lines.append(
        f"{'model':<10} {'median_s':>9} {'min_s':>8} {'max_s':>8} {'iqr_s':>7} "
        f"{'per_image_s':>11} {rate:>9}   {ours}/model (paired median, range)"
    )
    for name, e in summary.items():
        ratio = ""
        if "ratio_ours_over_this" in e:
            lo, hi = e["ratio_range"]
            ratio = f"{e['ratio_ours_over_this']:.3f} ({lo:.3f}-{hi:.3f})"
        lines.append(
            f"{name:<10} {e['median_s']:9.3f} {e['min_s']:8.3f} {e['max_s']:8.3f} "
            f"{e['iqr_s']:7.3f} {e['per_image_s']:11.3f} {e['images_per_s']:9.2f}   {ratio}"
        )
    lines.append("stages (median seconds, median share of the iteration):")
    for name, e in summary.items():
        parts = ", ".join(
            f"{k} {v:.3f} ({e['stage_share'][k]:.1%})" for k, v in e["stages_s"].items()
        )
        lines.append(f"  {name}: {parts}")
    for name, e in summary.items():
        share = e["stage_share"]
        if task == "inference":
            lines.append(f"postprocess share {name}: {share['postprocess']:.1%}")
        else:
            core = share["backbone+head forward"] + share["backbone+head backward"]
            tl = sum(share.get(k, 0.0) for k in _TARGETS_AND_LOSSES)
            lines.append(
                f"train share {name}: targets+losses (fwd+bwd) {tl:.1%}, "
                f"outside backbone+head fwd/bwd {1 - core:.1%}"
            )
    return "\n".join(lines)


def format_flops(flops: Dict[str, Dict[str, float]], ours: str) -> str:
    """One line per model of :func:`~gfocalv2.benchmark.timing.count_flops`'s GFLOPs, with
    the ratio ours / model."""
    lines = []
    for name, f in flops.items():
        ratio = flops[ours]["total_gflops"] / f["total_gflops"]
        lines.append(
            f"GFLOPs {name}: backbone+FPN {f['backbone_gflops']:.1f}, "
            f"head {f['head_gflops']:.1f}, "
            f"total {f['total_gflops']:.1f} ({ours}/{name} {ratio:.3f})"
        )
    return "\n".join(lines)
