"""Mixed precision (SOLVER.AMP-style autocast; bfloat16 on CPU): training steps keep the
losses in float32 and finite while the network runs in low precision; inference under
autocast gives the float32 model's detections within tolerance. The trainer with
SOLVER.AMP.ENABLED: tests/engine/test_amp_trainer.py."""

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou

from tests.utils.models import gfocal_cfg, random_input, varied_model

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def record_dtype(module, seen):
    return module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))


@pytest.mark.parametrize("dgqp", [True, False], ids=["gflv2", "gflv1"])
def test_autocast_training_steps(dgqp):
    g = torch.Generator().manual_seed(0)
    model = build_model(gfocal_cfg("MODEL.GFOCAL.DGQP_ENABLED", dgqp, tiny=True))
    model.train()
    batch = [random_input(g, 96, 128, 5, 3), random_input(g, 64, 96, 2, 3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    head_dtypes = []
    handle = record_dtype(model.head.bbox_pred, head_dtypes)
    history = []
    for _ in range(4):
        with torch.autocast(**AUTOCAST):
            losses = model(batch)
        for name, value in losses.items():
            assert value.dtype == torch.float32, name
            assert torch.isfinite(value), (name, value)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()  # outside autocast, as Detectron2's AMPTrainer does
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        optimizer.step()
        history.append(total.item())
    handle.remove()
    assert set(head_dtypes) == {torch.bfloat16}  # the network really ran in bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert history[-1] < history[0]  # and it learns


def test_autocast_losses_close_to_float32():
    g = torch.Generator().manual_seed(1)
    model = build_model(gfocal_cfg(tiny=True))
    model.train()
    batch = [random_input(g, 96, 128, 6, 3)]
    full = model(batch)
    with torch.autocast(**AUTOCAST):
        half = model(batch)
    for name in full:
        torch.testing.assert_close(half[name], full[name], rtol=0.05, atol=1e-3, msg=name)


def test_autocast_inference_same_detections():
    model = varied_model()
    g = torch.Generator().manual_seed(2)
    image = torch.rand(3, 96, 128, generator=g) * 255
    with torch.no_grad():
        full = model([{"image": image}])[0]["instances"]
        seen = []
        handle = record_dtype(model.head.cls_score, seen)
        with torch.autocast(**AUTOCAST):
            half = model([{"image": image}])[0]["instances"]
        handle.remove()
    assert set(seen) == {torch.bfloat16}
    assert half.scores.dtype == torch.float32 and half.pred_boxes.tensor.dtype == torch.float32
    assert len(full) >= 10 and abs(len(half) - len(full)) <= max(2, len(full) // 10)
    # Every confident float32 detection has a bfloat16 twin: same class, IoU > 0.9, score within
    # 0.02.
    confident = full[full.scores > 0.1]
    assert len(confident) >= 5
    iou = pairwise_iou(confident.pred_boxes, half.pred_boxes)  # (F, H)
    same_class = confident.pred_classes[:, None] == half.pred_classes[None, :]
    close_score = (confident.scores[:, None] - half.scores[None, :]).abs() < 0.02
    matched = ((iou > 0.9) & same_class & close_score).any(dim=1)
    # The best ones all survive; further down, where neighbours' scores differ by less than
    # bfloat16's resolution, NMS may keep a neighbour instead (a few percent).
    assert matched[:20].all(), matched[:20]
    assert matched.float().mean() >= 0.95, (
        f"{int((~matched).sum())} of {len(confident)} detections lost under autocast"
    )
