"""Where a detector loses AP: the six main error types of TIDE (Bolya et al., "TIDE: A General
Toolbox for Identifying Object Detection Errors", ECCV 2020), for boxes, written here in NumPy.

The ``tidecv`` package (1.0.1) computes the same, and runs with NumPy 2, but it requires
``opencv-python``, which would be installed next to this project's ``opencv-python-headless``
(two distributions of the one ``cv2`` module), plus pandas and seaborn, and its COCO loader needs
a ``segmentation`` in every ground-truth annotation even for boxes. This module reproduces its
definitions (checked against tidecv on DigitScenes: same dAP to 0.01).

Matching, per image, at IoU 0.5 (AP50), as TIDE does: the image's top 100 detections by score,
in that order, each take the unmatched ground-truth box of their class with the highest IoU if it
is >= 0.5 (true positives). A detection left unmatched that covers a crowd box of its class
(intersection / its area > 0.5) is ignored by AP. Every other detection is a false positive of
the first of these types that applies (IoU with ground-truth boxes; fg = 0.5, bg = 0.1):

* **Loc** (localization): IoU in [0.1, 0.5] with a box of its class;
* **Cls** (classification): IoU >= 0.5 with a box of another class;
* **Dupe** (duplicate): IoU >= 0.5 with a box of its class that a higher-scoring detection
  already matched;
* **Bkg** (background): IoU <= 0.1 with every box (or the image has none);
* **Both**: none of the above (wrong class and IoU in (0.1, 0.5) with a box).

A ground-truth box that no detection matched and that no Cls or Loc error points at is **Miss**.

The dAP of a type is the AP50 (mean over classes, TIDE's 101-point interpolation) after fixing
only the errors of that type, minus the AP50 before, at least 0. Fixing: a Cls or Loc error
becomes a true positive of the box it points at, if that box is unmatched and this is the
highest-scoring error pointing at it (other such errors are dropped); Dupe, Bkg and Both false
positives are dropped; a Miss box is removed from the ground truth.
"""

import numpy as np

from .quality import box_iou_xywh, same_key_pairs

__all__ = ["ERROR_TYPES", "tide_errors", "tide_ap"]

#: The six main error types, in TIDE's order.
ERROR_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
CLS, LOC, BOTH, DUPE, BKG = 0, 1, 2, 3, 4
FG, BG, MAX_DETS = 0.5, 0.1, 100


def tide_ap(cls, score, tp, num_gt):
    """TIDE's AP (0-100): mean over the classes that have ground truth or detections.

    Args:
        cls, score, tp: (P,) class, score and true-positive flag of the AP data points
            (equal scores keep this order).
        num_gt: ``{class: number of ground-truth boxes}``.
    """
    aps = []
    for c in sorted(set(num_gt) | set(np.unique(cls).tolist())):
        sel = cls == c
        n = num_gt.get(c, 0)
        if n == 0:
            if sel.any():
                aps.append(0.0)  # detections of a class without ground truth: AP 0
            continue
        hits = tp[sel][np.argsort(-score[sel], kind="stable")]
        num_true = np.cumsum(hits)
        precision = num_true / np.arange(1, len(hits) + 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(num_true / n, np.arange(101) / 100, side="left")
        curve = np.where(idx < len(hits), precision[np.minimum(idx, len(hits) - 1)], 0.0)
        aps.append(float(curve.mean()) * 100)
    return float(np.mean(aps)) if aps else 0.0


def _per_det_max(i, j, value, n):
    """Over the pairs (i, j) with ``value``, each detection's highest value (0 if none) and its
    j (-1 if none): (n,) float64 and (n,) int64."""
    best, arg = np.zeros(n), np.full(n, -1, dtype=np.int64)
    if len(i):
        order = np.lexsort((j, -value, i))
        first = order[np.unique(i[order], return_index=True)[1]]
        best[i[first]], arg[i[first]] = value[first], j[first]
    return best, arg


def _keep_top(dets):
    """Indices of each image's top ``MAX_DETS`` detections, by image then descending score
    (file order on ties), and their rank in their image."""
    order = np.lexsort((np.arange(len(dets)), -dets.score, dets.image_id))
    img = dets.image_id[order]
    start = np.r_[True, img[1:] != img[:-1]]
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))
    keep = rank < MAX_DETS
    return order[keep], rank[keep]


def _match(d_img, d_cls, d_box, d_rank, gt_img, gt_cls, gt_box):
    """Greedy matching at IoU >= FG, rank by rank (each rank of all images at once).
    Returns the detections' IoU pairs with every box of their image and the matches."""
    i, j = same_key_pairs(d_img, gt_img)  # every (detection, box) pair of the same image
    iou = box_iou_xywh(d_box[i], gt_box[j])
    same = d_cls[i] == gt_cls[j]
    match = np.full(len(d_img), -1, dtype=np.int64)
    gt_used = np.zeros(len(gt_img), dtype=bool)
    cand = same & (iou >= FG)
    for r in range(int(d_rank.max()) + 1 if len(d_rank) else 0):
        sel = np.flatnonzero(cand & (d_rank[i] == r) & ~gt_used[j])
        best, arg = _per_det_max(i[sel], j[sel], iou[sel], len(d_img))
        hit = arg >= 0  # detections of rank r in different images: their boxes are distinct
        match[hit] = arg[hit]
        gt_used[arg[hit]] = True
    return i, j, iou, same, match, gt_used


def tide_errors(gt, dets):
    """TIDE's main errors of :class:`~.coco.Detections` ``dets`` on :class:`~.coco.GroundTruth`
    ``gt`` (module docstring).

    Returns:
        ``{"ap50": float, "dap": {type: float}, "count": {type: int}}``, types in
        :data:`ERROR_TYPES` order (dAP in AP points, 0-100).
    """
    keep, rank = _keep_top(dets)
    d_img, d_cls = dets.image_id[keep], dets.category_id[keep]
    d_box, d_score = dets.box[keep], dets.score[keep]
    crowd = gt.crowd
    gt_img, gt_cls, gt_box = gt.image_id[~crowd], gt.category_id[~crowd], gt.box[~crowd]
    n, m = len(d_img), len(gt_img)
    i, j, iou, same, match, gt_used = _match(d_img, d_cls, d_box, rank, gt_img, gt_cls, gt_box)
    tp = match >= 0

    # Unmatched detections on a crowd box of their class are ignored by AP.
    ci, cj = same_key_pairs(
        np.stack([d_img, d_cls], 1), np.stack([gt.image_id[crowd], gt.category_id[crowd]], 1)
    )
    on_crowd = box_iou_xywh(d_box[ci], gt.box[crowd][cj], crowd=True) > FG
    ignored = np.zeros(n, dtype=bool)
    ignored[ci[on_crowd]] = True
    ignored &= ~tp

    # Error type of every detection that is not a true positive.
    cls_iou, cls_arg = _per_det_max(i, j, np.where(same, iou, 0), n)
    other_iou, other_arg = _per_det_max(i, j, np.where(same, 0, iou), n)
    dupe_iou, _ = _per_det_max(i, j, np.where(same & gt_used[j], iou, 0), n)
    any_iou, _ = _per_det_max(i, j, iou, n)
    has_gt = np.isin(d_img, gt_img)
    kind = np.select(
        [
            ~has_gt,
            (cls_iou >= BG) & (cls_iou <= FG),
            other_iou >= FG,
            dupe_iou >= FG,
            any_iou <= BG,
        ],
        [BKG, LOC, CLS, DUPE, BKG],
        BOTH,
    )
    kind[tp] = -1
    target = np.where(kind == LOC, cls_arg, np.where(kind == CLS, other_arg, -1))

    # The Cls / Loc error that fixes its box: the box is unmatched, the error scores highest.
    fixable = (target >= 0) & ~gt_used[np.maximum(target, 0)]
    f = np.flatnonzero(fixable)
    fixer = np.zeros(n, dtype=bool)
    if len(f):
        order = f[np.lexsort((np.arange(len(f)), -d_score[f], target[f]))]
        fixer[order[np.unique(target[order], return_index=True)[1]]] = True
    targeted = np.zeros(m, dtype=bool)
    targeted[target[fixable]] = True
    missed = ~gt_used & ~targeted

    num_gt = dict(zip(*np.unique(gt_cls, return_counts=True)))
    num_gt = {int(k): int(v) for k, v in num_gt.items()}
    counted = ~ignored
    base = tide_ap(d_cls[counted], d_score[counted], tp[counted], num_gt)
    dap, count = {}, {}
    for code, name in enumerate(ERROR_TYPES[:5]):
        err = kind == code
        count[name] = int(err.sum())
        fixed = err & fixer  # becomes a true positive of its box's class
        points = (counted & ~err) | fixed
        cls = np.where(fixed, gt_cls[np.maximum(target, 0)], d_cls)
        ap = tide_ap(cls[points], d_score[points], (tp | fixed)[points], num_gt)
        dap[name] = max(ap - base, 0.0)
    fewer = dict(num_gt)
    for c, k in zip(*np.unique(gt_cls[missed], return_counts=True)):
        fewer[int(c)] -= int(k)
    dap["Miss"] = max(tide_ap(d_cls[counted], d_score[counted], tp[counted], fewer) - base, 0.0)
    count["Miss"] = int(missed.sum())
    return {"ap50": base, "dap": dap, "count": count}
