"""Mixed precision (SOLVER.AMP-style autocast; bfloat16 on CPU): training steps keep the
losses in float32 and finite while the network runs in low precision; inference under
autocast gives the float32 model's detections within tolerance. The trainer with
SOLVER.AMP.ENABLED: tests/engine/test_amp_trainer.py.

Tolerances are derived from bfloat16's resolution, not from one CPU's results. A CPU with
native bfloat16 (AVX512-BF16, AMX) and one without (AVX2, AVX512 without BF16: oneDNN and ATen
convert to float32 and may round partial sums to bfloat16) round differently; both must pass.
To run these tests on the non-native path on a CPU that has it:

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python -m pytest tests/modeling/test_autocast.py

The derivation (the constants below):

- bfloat16 has 8 significant bits: a rounding has relative error at most U = 2^-8, uniformly
  distributed, so of RMS U / sqrt(3).
- A convolution under autocast rounds its input activations, its weights and its output to
  bfloat16: three roundings, an RMS relative error of U per convolution. Without native
  bfloat16, partial sums may be rounded too: at most about 2 U per convolution.
- The norm after each convolution keeps the activations at their scale, so the independent
  errors of the DEPTH convolutions on the longest path add in quadrature: the outputs of the
  network have an RMS error of about EPS = U * sqrt(DEPTH) of their scale. DEPTH = 25: the stem,
  16 convolutions of ResNet-18's res2-res5, FPN lateral + output, P6 and P7, the head's tower
  conv and predictor, the DGQP's two 1x1 convs.
- Measured on the model of these tests (AVX512-BF16 and forced AVX2 alike): 0.014-0.019 RMS
  relative error on the FPN features, 0.011-0.026 on the class logits (EPS = 0.0195).
"""

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, pairwise_iou

from gfocalv2.modeling.box_coder import distance_to_box, distribution_to_distance

from tests.utils.models import gfocal_cfg, random_input, varied_model

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)

U = 2.0**-8  # bfloat16's relative rounding error (8 significant bits)
DEPTH = 25  # convolutions on the longest path from the image to an output (module docstring)
EPS = U * DEPTH**0.5  # expected RMS relative error of the network's outputs: 0.0195
# The RMS error may reach 2 EPS (partial sums rounded without native bfloat16): bound it by 3 EPS.
RMS_FACTOR = 3.0
# The largest of N <= 10^4 independent errors (the dense outputs of one image) is within
# sqrt(2 ln 10^4) = 4.3 times their RMS, at most 2 EPS: 4.3 * 2 = 8.6 -> 9 EPS.
MAX_FACTOR = 9.0


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
    # Each loss is a smooth function of the network's outputs, whose relative error is about EPS
    # (module docstring); when the per-location errors are all of one sign (no averaging out), a
    # loss moves by about its own size times EPS. rtol = 2.5 EPS = 0.049. Measured: at most
    # 0.003 relative (QFL), with and without native bfloat16.
    for name in full:
        torch.testing.assert_close(half[name], full[name], rtol=2.5 * EPS, atol=1e-3, msg=name)


def detect(model, image, autocast):
    """Detections of ``model`` on ``image`` and the dense outputs they were selected from (as
    the model computed them: recorded by a hook on the head during the same forward pass)."""
    seen = {}

    def hook(module, args, output):
        seen["features"], seen["predictions"] = args[0], output

    handle = model.head.register_forward_hook(hook)
    try:
        with torch.no_grad(), torch.autocast(**AUTOCAST, enabled=autocast):
            detections = model([{"image": image}])[0]["instances"]
    finally:
        handle.remove()
    return detections, dense_outputs(model, image.shape[-2:], **seen)


def dense_outputs(model, image_size, features, predictions):
    """Per location (all levels, finest first), in float32: the class, box and quality logits
    (the conv outputs, without their bias), joint scores, decoded and clipped boxes, strides."""
    cls, box, quality = predictions
    head, C, R = model.head, model.num_classes, model.reg_max
    with torch.no_grad():
        anchors, strides = model._anchors(features)
        centers = torch.cat([(a[:, :2] + a[:, 2:]) / 2 for a in anchors])
        strides = torch.cat(strides)
        cls = torch.cat([permute_to_N_HWA_K(x.float(), C)[0] for x in cls])
        quality = torch.cat([permute_to_N_HWA_K(x.float(), 1)[0] for x in quality])
        box = torch.cat(
            [
                permute_to_N_HWA_K((x / s.scale).float(), 4 * (R + 1))[0]
                for x, s in zip(box, head.scales)
            ]
        )
        distances = distribution_to_distance(box, R)  # in bins
        boxes = Boxes(distance_to_box(centers, distances * strides[:, None]))
        boxes.clip(tuple(image_size))
        return {
            "cls": cls - head.cls_score.bias,
            "box": box - head.bbox_pred.bias,
            "quality": quality - head.dgqp[-1].bias,
            "scores": model.joint_scores(cls, quality),
            "distances": distances,
            "boxes": boxes,
            "strides": strides,
        }


def check_same_detections(model, full, full_dense, half, half_dense):
    """Asserts that the bfloat16 run (``half``) gives the float32 run's (``full``) dense outputs
    within the tolerances derived from bfloat16's resolution (module docstring), and the same
    detections in a way that does not depend on which of two near-tied neighbours NMS keeps."""
    head = model.head
    tolerance = {}
    for name, bias in [
        ("cls", head.cls_score.bias),
        ("box", head.bbox_pred.bias),
        ("quality", head.dgqp[-1].bias),
    ]:
        a, b = full_dense[name], half_dense[name]
        scale = a.pow(2).mean().sqrt()  # the outputs' scale, their bias aside
        # Plus the bias's own rounding to bfloat16 (the same at every location).
        bias_rounding = U * bias.abs().max().item()
        rms_tol = RMS_FACTOR * EPS * scale + bias_rounding
        max_tol = MAX_FACTOR * EPS * scale + bias_rounding
        error = (b - a).abs()
        assert error.pow(2).mean().sqrt() <= rms_tol, (name, error.pow(2).mean().sqrt(), rms_tol)
        assert error.max() <= max_tol, (name, error.max(), max_tol)
        tolerance[name] = max_tol
    # A side's distance is the expectation of its softmax distribution over the bins 0..R:
    # d E = sum_j p_j (j - E) dz_j, so |d E| <= max |dz| * (mean absolute deviation <= R / 2).
    distance_tol = model.reg_max / 2 * tolerance["box"]
    distance_error = (half_dense["distances"] - full_dense["distances"]).abs().max()
    assert distance_error <= distance_tol, (distance_error, distance_tol)
    # A joint score is sigmoid(class) * sigmoid(quality): sigmoid' <= 1/4 and both factors <= 1.
    score_tol = (tolerance["cls"] + tolerance["quality"]) / 4
    score_error = (half_dense["scores"] - full_dense["scores"]).abs().max()
    assert score_error <= score_tol, (score_error, score_tol)

    assert half.scores.dtype == torch.float32 and half.pred_boxes.tensor.dtype == torch.float32
    # Post-processing: every detection of one run is covered by one of the other run. A detection
    # d at location i has in the other run a twin t at i, with a score within score_tol and
    # IoU(d, t) >= twin_iou (computed below, from the dense boxes). Either NMS keeps t, or it
    # removes t for a kept detection e of the same class, a score >= t's and IoU(e, t) > the NMS
    # threshold. 1 - IoU is a distance (Jaccard), so IoU(d, e) > twin_iou - (1 - nms_thresh).
    # The scores of the candidates above the threshold are all kept (1000 per level > this
    # image's locations); the twin must score above the threshold, and its cover must rank
    # within the detections kept per image.
    candidates = (full_dense["scores"].amax(1) > model.test_score_thresh) | (
        half_dense["scores"].amax(1) > model.test_score_thresh
    )
    twin_iou = pairwise_iou(full_dense["boxes"][candidates], half_dense["boxes"][candidates])
    twin_iou = twin_iou.diagonal().min().item()
    assert twin_iou > 0.9, twin_iou  # the distance bound above, in pixels of these boxes
    required_iou = twin_iou - (1 - model.test_nms_thresh)
    for a, b in [(full, half), (half, full)]:
        assert len(a) >= 10
        floor = model.test_score_thresh
        if len(b) == model.max_detections_per_image:
            floor = max(floor, b.scores.min().item())
        covered = a[a.scores - score_tol > floor]
        assert len(covered) >= 5, (len(covered), floor)
        iou = pairwise_iou(covered.pred_boxes, b.pred_boxes)  # (A, B)
        same_class = covered.pred_classes[:, None] == b.pred_classes[None, :]
        high_enough = b.scores[None, :] >= covered.scores[:, None] - score_tol
        matched = ((iou > required_iou) & same_class & high_enough).any(dim=1)
        assert matched.all(), (
            f"{int((~matched).sum())} of {len(covered)} detections not covered "
            f"(required IoU {required_iou:.3f}, score tolerance {score_tol:.4f}): "
            f"{torch.nonzero(~matched).flatten().tolist()}"
        )


@pytest.fixture(scope="module")
def float32_run():
    model = varied_model()
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(2)) * 255
    return model, image, detect(model, image, autocast=False)


def test_autocast_inference_same_detections(float32_run):
    model, image, (full, full_dense) = float32_run
    seen = []
    handle = record_dtype(model.head.cls_score, seen)
    half, half_dense = detect(model, image, autocast=True)
    handle.remove()
    assert set(seen) == {torch.bfloat16}  # the head really ran in bfloat16
    check_same_detections(model, full, full_dense, half, half_dense)


@pytest.mark.parametrize("broken", ["class_logits_shifted", "boxes_sharpened", "detection_lost"])
def test_autocast_comparison_catches_a_broken_autocast(float32_run, broken):
    """The comparison above fails when autocast is broken: the class logits moved by 0.2 (a
    score shift of about 0.02 at these scores), the box distributions sharpened (logits x 1.25),
    or one confident detection lost. Guards the test against tolerances too wide to see a break
    (measured: the dense errors stay within 1/2.7 of their RMS bounds and 1/2 of their maximum
    bounds, with and without native bfloat16)."""
    model, image, (full, full_dense) = float32_run
    conv = model.head.cls_score if broken == "class_logits_shifted" else model.head.bbox_pred

    def shift(module, args, output):
        if not torch.is_autocast_enabled("cpu"):
            return output
        return output + 0.2 if broken == "class_logits_shifted" else output * 1.25

    handle = conv.register_forward_hook(shift) if broken != "detection_lost" else None
    half, half_dense = detect(model, image, autocast=True)
    if handle is not None:
        handle.remove()
    else:
        half = half[torch.arange(len(half)) != 3]
    with pytest.raises(AssertionError):
        check_same_detections(model, full, full_dense, half, half_dense)
