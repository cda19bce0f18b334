"""Inference on a batch of images of different sizes (issue 13, point 8): an image's
detections do not depend on the other images of its batch.

The locations of the batch-padded tensor beyond an image's own padded size (a multiple of
32) exist only because a larger image shares the batch. Before the fix they were ranked with
the image's own locations, their boxes were clipped to zero area and took detection slots
(55 of a 128 x 256 image's 100 detections in a batch with a 256 x 384 image).
"""

import math

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import ImageList

from tests.utils.models import gfocal_cfg

STRIDES = (8, 16, 32, 64, 128)
DIV = 32


def level_shapes(h, w):
    ph, pw = math.ceil(h / DIV) * DIV, math.ceil(w / DIV) * DIV
    return [(math.ceil(ph / s), math.ceil(pw / s)) for s in STRIDES]


def run_inference(model, image_sizes, predictions):
    """model.forward_inference on fixed per-level predictions (dummy features: the anchors
    only read their shapes) -> per-image Instances in the (resized, unpadded) image frame."""
    H = max(math.ceil(h / DIV) * DIV for h, _ in image_sizes)
    W = max(math.ceil(w / DIV) * DIV for _, w in image_sizes)
    images = ImageList(torch.zeros(len(image_sizes), 3, H, W), list(image_sizes))
    features = [torch.zeros(len(image_sizes), 1, h, w) for h, w in level_shapes(H, W)]
    with torch.no_grad():
        return model.forward_inference(images, features, predictions)


def test_boxes_empty_after_clipping_are_dropped_before_nms():
    """As MMDetection's ``min_bbox_size=0`` filter: a candidate whose box is empty once
    clipped to the image (here a location right of a 100 x 100 image regressing 1 stride to
    each side: [112, 2, 128, 18] clips to [100, 2, 100, 18]) is not a detection, even alone
    and with the highest score."""
    model = build_model(gfocal_cfg(tiny=True)).eval()
    reg_max = model.reg_max
    logits = torch.full((4, reg_max + 1), -50.0)
    logits[:, 1] = 50.0  # every side: 1 x stride
    centers = [torch.tensor([[10.0, 10.0], [120.0, 10.0], [50.0, 104.0]])]
    scores = [torch.tensor([[0.5, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.8, 0.0]])]
    inst = model.inference_single_image(
        centers, [torch.full((3,), 8.0)], scores, [logits.reshape(1, -1).repeat(3, 1)], (100, 100)
    )
    assert len(inst) == 2  # the third box [42, 96, 58, 112] clips to a non-empty [42, 96, 58, 100]
    torch.testing.assert_close(inst.scores, torch.tensor([0.8, 0.5]))
    torch.testing.assert_close(
        inst.pred_boxes.tensor, torch.tensor([[42.0, 96.0, 58.0, 100.0], [2.0, 2.0, 18.0, 18.0]])
    )


@pytest.mark.parametrize("topk", [1000, 12])
def test_small_image_detections_do_not_depend_on_the_batch(topk):
    """Fixed head outputs, so the comparison is exact (the head's GroupNorm would otherwise
    make the predictions themselves depend on the padding): a 50 x 90 image (padded to
    64 x 96) alone, and in a batch with a 160 x 224 image where its predictions are the same
    maps placed top-left and the batch padding holds confident garbage (scores ~0.95).

    Compared: the small image's detections in the batch are exactly its detections alone
    (same number, boxes, scores and classes); none has zero area or lies outside the image.
    ``topk`` 12 (TOPK_CANDIDATES_TEST) makes the garbage compete for the per-level top-k
    slots too. Rows 50-63 (the image's own padding to 64) stay valid, as in the reference.
    """
    model = build_model(
        gfocal_cfg(
            "MODEL.GFOCAL.TOPK_CANDIDATES_TEST",
            topk,
            "MODEL.GFOCAL.DETECTIONS_PER_IMAGE",
            1000,
            tiny=True,
        )
    ).eval()
    g = torch.Generator().manual_seed(20)
    small, large = (50, 90), (160, 224)
    small_shapes, large_shapes = level_shapes(*small), level_shapes(*large)
    C, B = model.num_classes, 4 * (model.reg_max + 1)
    channels = (C, B, 1)

    def maps(shapes, offset=0.0):
        return [
            [
                torch.randn(1, k, h, w, generator=g) * 2.0 + (offset if k != B else 0.0)
                for h, w in shapes
            ]
            for k in channels
        ]

    alone = maps(small_shapes)
    embedded = maps(large_shapes, offset=3.0)  # garbage: class and quality logits around 3
    for level_alone, level_big in zip(alone, embedded):
        for a, b in zip(level_alone, level_big):
            b[..., : a.shape[2], : a.shape[3]] = a
    other = maps(large_shapes)
    batch = tuple(
        [torch.cat([e, o]) for e, o in zip(levels_e, levels_o)]
        for levels_e, levels_o in zip(embedded, other)
    )

    (want,) = run_inference(model, [small], tuple(alone))
    got, got_large = run_inference(model, [small, large], batch)
    (want_large,) = run_inference(model, [large], tuple(other))

    b = got.pred_boxes.tensor
    assert len(want) > 20
    assert ((b[:, 2] - b[:, 0]) > 0).all() and ((b[:, 3] - b[:, 1]) > 0).all()
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= small[1]).all() and (b[:, 3] <= small[0]).all()
    # The same float32 arithmetic on the same values, but at other positions of larger tensors:
    # ATen computes a tensor's body with SIMD functions and its tail with scalar ones (sigmoid,
    # exp: within 1 ulp of each other), and where a value falls depends on the CPU's vector
    # width. So a few ulps (2^-24 relative each), not bit equality: scores within 2^-20
    # relative, box coordinates (<= 224 px) within 224 x 2^-20 px. A misplaced mask would move
    # them by whole pixels and change the count or the classes.
    assert len(got) == len(want)
    assert torch.equal(got.pred_classes, want.pred_classes)
    torch.testing.assert_close(got.scores, want.scores, rtol=2**-20, atol=0)
    torch.testing.assert_close(
        got.pred_boxes.tensor, want.pred_boxes.tensor, rtol=0, atol=224 * 2**-20
    )
    # The large image fills the batch: its results are its results alone.
    assert len(got_large) == len(want_large)
    torch.testing.assert_close(got_large.scores, want_large.scores, rtol=2**-20, atol=0)
    torch.testing.assert_close(
        got_large.pred_boxes.tensor, want_large.pred_boxes.tensor, rtol=0, atol=224 * 2**-20
    )


def test_whole_model_batch_of_a_large_and_a_small_image():
    """End to end, the issue's case: a 256 x 384 and a 128 x 256 image through a tiny model
    whose every location and class scores sigmoid(10)^2 (all tied, so the batch padding
    competes on equal terms; boxes from the freshly initialized regression branch, about
    4 strides from each location). Before the fix the ties went to padding locations beyond
    the small image and all 100 of its detections were zero-area boxes clipped at its border
    (Detectron2's postprocessing then removed them all). The backbone and head see the padding
    (border convolutions, GroupNorm statistics), so boxes differ from the image alone and
    are not compared; compared are what must not depend on the batch: no zero-area
    detection and none outside the image (in ``forward_inference``'s output, before the
    postprocessing's empty-box filter), and as many detections as alone."""
    torch.manual_seed(0)
    model = build_model(gfocal_cfg(tiny=True)).eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(10.0)
        model.head.cls_score.weight.zero_()
        model.head.dgqp[2].bias.fill_(10.0)
        model.head.dgqp[2].weight.zero_()
    g = torch.Generator().manual_seed(21)
    batch = [
        {"image": torch.rand(3, 256, 384, generator=g) * 255},
        {"image": torch.rand(3, 128, 256, generator=g) * 255},
    ]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        raw = model.forward_inference(images, features, model.head(features))[1]
        in_batch = model(batch)[1]["instances"]
        alone = model(batch[1:])[0]["instances"]
    b = raw.pred_boxes.tensor
    assert len(raw) == 100
    assert ((b[:, 2] - b[:, 0]) > 0).all() and ((b[:, 3] - b[:, 1]) > 0).all()
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= 256).all() and (b[:, 3] <= 128).all()
    assert len(in_batch) == len(alone) == 100
