"""A tiny GFocalV2 overfits a few synthetic images: the whole training path (ATSS, QFL,
DFL, GIoU, DGQP) must drive the detections onto the ground truth."""

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou

from tests.utils.models import gfocal_cfg, instances

COLORS = torch.tensor([[230.0, 40, 40], [40, 200, 40], [40, 60, 230]])


def synthetic_scene(g, h=96, w=96, n=3):
    image = torch.full((3, h, w), 20.0) + torch.rand(3, h, w, generator=g) * 20
    boxes, classes = [], []
    for _ in range(n):
        size = torch.randint(16, 40, (2,), generator=g)
        x0 = int(torch.randint(0, w - int(size[0]), (1,), generator=g))
        y0 = int(torch.randint(0, h - int(size[1]), (1,), generator=g))
        c = int(torch.randint(0, 3, (1,), generator=g))
        image[:, y0 : y0 + int(size[1]), x0 : x0 + int(size[0])] = COLORS[c][:, None, None]
        boxes.append([x0, y0, x0 + int(size[0]), y0 + int(size[1])])
        classes.append(c)
    return image, torch.tensor(boxes, dtype=torch.float32), torch.tensor(classes)


def average_precision_at_50(model, scenes):
    """VOC-style AP at IoU 0.5 over all classes and images (all-point interpolation)."""
    records, num_gt = [], 0
    with torch.no_grad():
        for image, boxes, classes in scenes:
            det = model([{"image": image}])[0]["instances"]
            num_gt += len(boxes)
            used = torch.zeros(len(boxes), dtype=torch.bool)
            order = det.scores.argsort(descending=True)
            ious = (
                pairwise_iou(det.pred_boxes[order], Boxes(boxes))
                if len(det)
                else torch.zeros(0, len(boxes))
            )
            for rank, d in enumerate(order.tolist()):
                same = (classes == det.pred_classes[d]) & ~used
                iou = torch.where(same, ious[rank], torch.zeros_like(ious[rank]))
                best = int(iou.argmax()) if len(boxes) else 0
                hit = len(boxes) > 0 and iou[best] >= 0.5
                if hit:
                    used[best] = True
                records.append((float(det.scores[d]), bool(hit)))
    records.sort(key=lambda r: -r[0])
    tp = torch.tensor([r[1] for r in records], dtype=torch.float64).cumsum(0)
    precision = tp / torch.arange(1, len(records) + 1)
    recall = tp / num_gt
    ap, prev_recall = 0.0, 0.0
    for i in range(len(records)):
        if records[i][1]:
            ap += precision[i:].max().item() * (recall[i].item() - prev_recall)
            prev_recall = recall[i].item()
    return ap


@pytest.mark.parametrize("dgqp", [True, False], ids=["gflv2", "gflv1"])
def test_tiny_model_overfits_synthetic_scenes(dgqp):
    g = torch.Generator().manual_seed(0)
    scenes = [synthetic_scene(g) for _ in range(2)]
    model = build_model(
        gfocal_cfg(
            "MODEL.GFOCAL.DGQP_ENABLED", dgqp, "MODEL.PIXEL_STD", [50.0, 50.0, 50.0], tiny=True
        )
    )
    batch = [{"image": im, "instances": instances((96, 96), b, c)} for im, b, c in scenes]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for step in range(150):
        losses = model(batch)
        loss = sum(losses.values())
        assert torch.isfinite(loss), (step, losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ap50 = average_precision_at_50(model, scenes)
    assert ap50 > 0.9, f"AP50 after overfitting: {ap50:.3f}, last losses {losses}"
