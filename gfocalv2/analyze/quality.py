"""How well a detector's scores rank its boxes by localization quality.

Every function works on flat NumPy arrays (one entry per detection or ground-truth box); boxes
are COCO's ``[x, y, width, height]``, as in ``coco_instances_results.json``. IoU is computed as
pycocotools computes it for boxes (continuous coordinates, no ``+1``).

The quality-IoU correlation of GFocalV2's paper, as :func:`quality_correlation` computes it:

1. for every detection, its IoU with the best-overlapping ground-truth box of the same class in
   the same image, crowd boxes excluded (:func:`best_gt_iou`; 0 when there is none);
2. over the detections whose best IoU is >= 0.5: the Pearson correlation coefficient between
   their scores and those IoUs, the Spearman coefficient (Pearson's of the ranks, ties given
   their average rank) and their count.
"""

import numpy as np

__all__ = [
    "box_iou_xywh",
    "same_key_pairs",
    "best_gt_iou",
    "pearson",
    "rankdata",
    "spearman",
    "quality_correlation",
    "reliability_bins",
    "MIN_IOU",
]

#: Detections with a best IoU below this are left out of the correlation (they are not boxes of
#: an object whose quality the score could rank).
MIN_IOU = 0.5


def box_iou_xywh(a, b, crowd=False):
    """IoU of the boxes ``a`` (N, 4) and ``b`` (N, 4), pair by pair: (N,) float64.

    With ``crowd=True`` it is pycocotools' crowd IoU: intersection / area of ``a``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    h = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_a = a[:, 2] * a[:, 3]
    union = area_a if crowd else area_a + b[:, 2] * b[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def same_key_pairs(keys_a, keys_b):
    """Every pair ``(i, j)`` with ``keys_a[i] == keys_b[j]``, as two index arrays (P,) sorted by
    ``i``: a join without a loop. ``keys_*`` are (N,) / (M,) integer arrays or (N, K) rows."""
    keys_a, keys_b = np.asarray(keys_a), np.asarray(keys_b)
    if keys_a.ndim == 2:  # rows -> one integer id per distinct row
        _, ids = np.unique(np.concatenate([keys_a, keys_b]), axis=0, return_inverse=True)
        ids = ids.reshape(-1)
        keys_a, keys_b = ids[: len(keys_a)], ids[len(keys_a) :]
    order_b = np.argsort(keys_b, kind="stable")
    sorted_b = keys_b[order_b]
    lo = np.searchsorted(sorted_b, keys_a, side="left")
    count = np.searchsorted(sorted_b, keys_a, side="right") - lo
    i = np.repeat(np.arange(len(keys_a)), count)
    offset = np.arange(len(i)) - np.repeat(np.cumsum(count) - count, count)
    return i, order_b[np.repeat(lo, count) + offset]


def best_gt_iou(det_image, det_class, det_box, gt_image, gt_class, gt_box, gt_crowd):
    """For each detection, its IoU with the best-overlapping non-crowd ground-truth box of the
    same class in the same image (0 when there is none).

    Args:
        det_image, det_class: (N,) image and category ids of the detections.
        det_box: (N, 4) XYWH boxes.
        gt_image, gt_class, gt_crowd: (M,) image ids, category ids, ``iscrowd`` flags.
        gt_box: (M, 4) XYWH boxes.

    Returns:
        (N,) float64 IoUs and (N,) int64 index of that ground-truth box (-1 when there is none).
    """
    keep = ~np.asarray(gt_crowd, dtype=bool)
    gt_index = np.flatnonzero(keep)
    i, j = same_key_pairs(
        np.stack([det_image, det_class], axis=1),
        np.stack([np.asarray(gt_image)[keep], np.asarray(gt_class)[keep]], axis=1),
    )
    iou = box_iou_xywh(np.asarray(det_box)[i], np.asarray(gt_box)[gt_index[j]])
    best = np.zeros(len(det_image))
    best_index = np.full(len(det_image), -1, dtype=np.int64)
    if len(i):
        # Per detection, its pair of highest IoU (lowest ground-truth index on ties).
        order = np.lexsort((j, -iou, i))
        first = order[np.unique(i[order], return_index=True)[1]]
        best[i[first]] = iou[first]
        best_index[i[first]] = gt_index[j[first]]
    return best, best_index


def pearson(x, y):
    """Pearson's correlation coefficient of (N,) ``x`` and ``y``; NaN when N < 2 or either is
    constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def rankdata(x):
    """Ranks 1..N of (N,) ``x``, ties given their average rank (SciPy's ``rankdata``)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new_group) - 1  # group of each sorted entry
    starts = np.r_[np.flatnonzero(new_group), len(x)]  # first position of each group, then N
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = 0.5 * (starts[group] + starts[group + 1] - 1) + 1
    return ranks


def spearman(x, y):
    """Spearman's rank correlation coefficient of (N,) ``x`` and ``y``."""
    return pearson(rankdata(x), rankdata(y))


def quality_correlation(scores, ious, min_iou=MIN_IOU):
    """The quality-IoU correlation over the detections whose best IoU is >= ``min_iou``.

    Args:
        scores, ious: (N,) the detections' scores and best IoUs (:func:`best_gt_iou`).

    Returns:
        ``{"pearson": float, "spearman": float, "num_detections": int}`` (NaN coefficients when
        fewer than 2 detections qualify or their scores or IoUs are all equal).
    """
    scores, ious = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    keep = ious >= min_iou
    return {
        "pearson": pearson(scores[keep], ious[keep]),
        "spearman": spearman(scores[keep], ious[keep]),
        "num_detections": int(keep.sum()),
    }


def reliability_bins(scores, ious, num_bins=10):
    """Mean best IoU of the detections in each of ``num_bins`` equal score bins over [0, 1]
    (every detection counts, those that overlap nothing with IoU 0).

    Returns:
        ``edges`` (num_bins + 1,), ``mean_iou`` (num_bins,) (NaN for an empty bin), ``count``
        (num_bins,) int64, ``mean_score`` (num_bins,).
    """
    scores, ious = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_iou = np.bincount(index, ious, minlength=num_bins) / count
        mean_score = np.bincount(index, scores, minlength=num_bins) / count
    return {"edges": edges, "mean_iou": mean_iou, "count": count, "mean_score": mean_score}
