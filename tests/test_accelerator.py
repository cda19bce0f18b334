"""The model on an accelerator (CUDA) against the same computation on the CPU.

These run wherever ``torch.cuda.is_available()`` (``make test`` on a GPU machine) and are
skipped elsewhere. ``GFOCALV2_TEST_DEVICE=cpu`` runs them with the CPU standing in for the
accelerator, which checks the tests themselves (every comparison then holds trivially).
TF32 is switched off for the comparisons: float32 on both sides.
"""

import copy
import os

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou

from gfocalv2.modeling import atss_assign
from gfocalv2.modeling.backbone.resnet import DeformConv2d
from gfocalv2.modeling.inference_optimization import optimize_for_inference

from tests.utils.atss import make_anchors
from tests.utils.models import gfocal_cfg, random_input, varied_model

DEVICE = os.environ.get("GFOCALV2_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no accelerator (CUDA) available")


@pytest.fixture(autouse=True)
def _float32_on_the_accelerator():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_device(batch, device):
    out = []
    for d in batch:
        d = dict(d)
        d["image"] = d["image"].to(device)
        if "instances" in d:
            d["instances"] = d["instances"].to(device)
        out.append(d)
    return out


def assert_close_relative(actual, expected, rel, name=""):
    """max |actual - expected| <= rel * max |expected| (float32 rounding at the tensor's scale)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{name}: max difference {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_deformable_conv_forward_and_backward_match_cpu(modulated):
    g = torch.Generator().manual_seed(0)
    conv = DeformConv2d(8, 16, 3, stride=1, padding=1)
    x = torch.randn(2, 8, 13, 17, generator=g)
    offset = torch.randn(2, 18, 13, 17, generator=g) * 3  # fractional, partly outside the image
    mask = torch.rand(2, 9, 13, 17, generator=g) if modulated else None
    grad_out = torch.randn(2, 16, 13, 17, generator=g)
    results = {}
    for device in ("cpu", DEVICE):
        c = copy.deepcopy(conv).to(device)
        inputs = [
            t.to(device).requires_grad_() for t in (x, offset) + ((mask,) if modulated else ())
        ]
        out = c(*inputs)
        out.backward(grad_out.to(device))
        results[device] = [out] + [t.grad for t in inputs] + [c.weight.grad]
    for i, (a, b) in enumerate(zip(results[DEVICE], results["cpu"])):
        assert_close_relative(a, b, 1e-4, f"output/gradient {i}")


def test_atss_assignment_matches_cpu():
    g = torch.Generator().manual_seed(1)
    levels = make_anchors((160, 224))
    anchors = torch.cat(levels)
    xy = torch.rand(2, 12, 2, generator=g) * torch.tensor([180.0, 120.0])
    wh = torch.rand(2, 12, 2, generator=g) * 80 + 4
    boxes = torch.cat([xy, xy + wh], -1)
    valid = torch.rand(2, 12, generator=g) > 0.2
    cpu = atss_assign(anchors, [len(lvl) for lvl in levels], boxes, valid)
    acc = atss_assign(
        anchors.to(DEVICE), [len(lvl) for lvl in levels], boxes.to(DEVICE), valid.to(DEVICE)
    )
    assert cpu[1].any()
    for a, b in zip(acc, cpu):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dgqp", [True, False], ids=["gflv2", "gflv1"])
def test_training_step_matches_cpu(dgqp):
    g = torch.Generator().manual_seed(2)
    cpu_model = build_model(gfocal_cfg("MODEL.GFOCAL.DGQP_ENABLED", dgqp, tiny=True)).train()
    acc_model = copy.deepcopy(cpu_model).to(DEVICE)
    batch = [
        random_input(g, 96, 128, 5, 3),
        random_input(g, 64, 96, 0, 3),
    ]  # one image without boxes
    grads = {}
    for model, device in ((cpu_model, "cpu"), (acc_model, DEVICE)):
        losses = model(to_device(batch, device))
        sum(losses.values()).backward()
        grads[device] = (
            losses,
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        )
    (cpu_losses, cpu_grads), (acc_losses, acc_grads) = grads["cpu"], grads[DEVICE]
    assert set(acc_losses) == set(cpu_losses) == {"loss_qfl", "loss_giou", "loss_dfl"}
    for name in cpu_losses:
        assert acc_losses[name].dtype == torch.float32
        assert_close_relative(acc_losses[name], cpu_losses[name], 1e-4, name)
    assert set(acc_grads) == set(cpu_grads)
    for name in cpu_grads:
        assert_close_relative(acc_grads[name], cpu_grads[name], 2e-3, name)


def _matched_fraction(reference, other, iou=0.9, score_tol=0.02):
    """Fraction of ``reference``'s detections with a twin in ``other``: same class, IoU > iou,
    score within score_tol."""
    reference, other = reference.to("cpu"), other.to("cpu")
    ious = pairwise_iou(reference.pred_boxes, other.pred_boxes)
    same_class = reference.pred_classes[:, None] == other.pred_classes[None, :]
    close = (reference.scores[:, None] - other.scores[None, :]).abs() < score_tol
    return ((ious > iou) & same_class & close).any(dim=1)


def test_inference_matches_cpu_and_optimized_inference_matches_too():
    cpu_model = varied_model()
    acc_model = copy.deepcopy(cpu_model).to(DEVICE)
    optimized = optimize_for_inference(copy.deepcopy(acc_model), gfocal_cfg(tiny=True))
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 96, 128, generator=g) * 255
    with torch.no_grad():
        cpu = cpu_model([{"image": image}])[0]["instances"]
        acc = acc_model([{"image": image.to(DEVICE)}])[0]["instances"]
        opt = optimized([{"image": image.to(DEVICE)}])[0]["instances"]
    assert len(cpu) >= 10
    for name, result in (("accelerator", acc), ("optimized", opt)):
        assert result.pred_boxes.tensor.device.type == torch.device(DEVICE).type
        assert abs(len(result) - len(cpu)) <= 1, name
        matched = _matched_fraction(cpu, result, iou=0.99, score_tol=1e-4)
        assert matched[:20].all() and matched.float().mean() >= 0.97, (name, int((~matched).sum()))


def test_float16_autocast_training_and_inference():
    """SOLVER.AMP on CUDA is Detectron2's AMPTrainer: float16 autocast + GradScaler."""
    g = torch.Generator().manual_seed(4)
    model = build_model(gfocal_cfg(tiny=True)).to(DEVICE).train()
    batch = to_device([random_input(g, 96, 128, 5, 3), random_input(g, 64, 96, 2, 3)], DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(torch.device(DEVICE).type)
    history = []
    for _ in range(4):
        with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.float16):
            losses = model(batch)
        for name, value in losses.items():
            assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
        total = sum(losses.values())
        optimizer.zero_grad()
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        history.append(total.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert history[-1] < history[0]

    model = varied_model().to(DEVICE)
    image = (torch.rand(3, 96, 128, generator=g) * 255).to(DEVICE)
    with torch.no_grad():
        full = model([{"image": image}])[0]["instances"]
        with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.float16):
            half = model([{"image": image}])[0]["instances"]
    confident = full[full.scores > 0.1]
    assert len(confident) >= 5 and half.scores.dtype == torch.float32
    matched = _matched_fraction(confident, half)
    assert matched[:20].all() and matched.float().mean() >= 0.95


def test_trainer_with_solver_amp(tiny_digits, tmp_path):
    from tests.utils.workflow import DIGITS_CONFIG, tiny_opts

    from gfocalv2.engine import Trainer, build_cfg, register_coco_datasets

    data = tiny_digits
    register_coco_datasets(
        [["acc_train", *map(str, data["train"])], ["acc_val", *map(str, data["val"])]]
    )
    opts = tiny_opts(tmp_path / "out", "acc_train", "acc_val", max_iter=3)
    opts += ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", DEVICE]
    cfg = build_cfg(DIGITS_CONFIG, [str(o) for o in opts])
    trainer = Trainer(cfg)
    assert next(trainer.model.parameters()).device.type == torch.device(DEVICE).type
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    for key in ("loss_qfl", "loss_giou", "loss_dfl"):
        assert torch.isfinite(torch.tensor(latest[key][0])), key
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
