"""Test-time augmentation (gfocalv2/test_time_augmentation.py): the views, their mapping back,
the merge, the batching, the settings checks and the Predictor's use of it."""

import copy

import pytest
import torch

from gfocalv2.config_checks import ConfigValueError
from gfocalv2.engine import build_cfg
from gfocalv2.engine.predictor import Predictor
from gfocalv2.test_time_augmentation import GFocalV2WithTTA, TTAView, tta_settings
from tests.utils.models import gfocal_cfg, tiny_config_file, varied_model

TEST_SIZE = ("INPUT.MIN_SIZE_TEST", 160, "INPUT.MAX_SIZE_TEST", 256)


def scene(seed, h, w):
    """A uint8 (3, h, w) image: coloured rectangles on noise (detections vary with position)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 60, (3, h, w), generator=g, dtype=torch.uint8)
    for _ in range(6):
        y, x = (
            int(torch.randint(0, h - 30, (1,), generator=g)),
            int(torch.randint(0, w - 30, (1,), generator=g)),
        )
        image[:, y : y + 28, x : x + 24] = torch.randint(120, 255, (3, 1, 1), generator=g).to(
            torch.uint8
        )
    return image


def tta_cfg(min_sizes, max_size, flip, *opts):
    return gfocal_cfg(
        *TEST_SIZE,
        "TEST.AUG.ENABLED",
        True,
        "TEST.AUG.MIN_SIZES",
        tuple(min_sizes),
        "TEST.AUG.MAX_SIZE",
        max_size,
        "TEST.AUG.FLIP",
        flip,
        "MODEL.GFOCAL.SCORE_THRESH_TEST",
        0.2,
        *opts,
        tiny=True,
    )


def same_detections(a, b):
    return (
        torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        and torch.equal(a.scores, b.scores)
        and torch.equal(a.pred_classes, b.pred_classes)
    )


@pytest.fixture(scope="module")
def model():
    return varied_model()


def test_one_view_at_the_test_size_is_the_plain_model_exactly(tmp_path, model):
    """Through the Predictor (which resizes as the test loader does): TEST.AUG with the one
    view MIN_SIZE_TEST / MAX_SIZE_TEST and no flip gives the plain model's detections bit for
    bit, for images smaller and larger than the test size, portrait and landscape."""
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    config = tiny_config_file(tmp_path)
    common = [*TEST_SIZE, "MODEL.WEIGHTS", str(weights), "MODEL.GFOCAL.SCORE_THRESH_TEST", 0.2]
    common += ["MODEL.PIXEL_STD", "[50.0, 50.0, 50.0]"]
    plain = Predictor(build_cfg(config, common))
    tta = Predictor(
        build_cfg(
            config,
            common
            + ["TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", "(160,)", "TEST.AUG.MAX_SIZE", 256]
            + ["TEST.AUG.FLIP", False],
        )
    )
    assert plain.tta is None and tta.tta is not None
    counts = []
    for seed, (h, w) in enumerate([(120, 150), (300, 220), (181, 517)]):
        image = scene(seed, h, w).permute(1, 2, 0).numpy()  # (H, W, 3) as a user passes it
        want, got = plain(image)["instances"], tta(image)["instances"]
        counts.append(len(want))
        assert got.image_size == want.image_size == (h, w)
        assert same_detections(got, want), (h, w)
    assert min(counts) >= 10, counts  # enough detections for the comparison to mean something


def test_view_boxes_map_back_by_flip_then_scale():
    """Computed independently: a box of a 100 x 200 (h x w) flipped view, x -> 200 - x, then
    scaled into a 50 x 100 frame (0.5 per axis)."""
    view = TTAView((100, 200), True, torch.zeros(3, 100, 200))
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 200.0, 100.0]])
    torch.testing.assert_close(
        view.to_frame(boxes, (50, 100)),
        torch.tensor([[85.0, 10.0, 95.0, 20.0], [0.0, 0.0, 100.0, 50.0]]),
    )
    unflipped = TTAView((100, 200), False, torch.zeros(3, 100, 200))
    torch.testing.assert_close(
        unflipped.to_frame(boxes, (200, 100)),
        torch.tensor([[5.0, 40.0, 15.0, 80.0], [0.0, 0.0, 100.0, 200.0]]),
    )


def test_views_sizes_and_flips():
    """Each MIN_SIZE gives the short side, MAX_SIZE caps the long one (Detectron2's
    ResizeShortestEdge); each view is followed by its mirror image when FLIP."""
    tta = GFocalV2WithTTA(tta_cfg((100, 240), 300, True), varied_model())
    image = scene(0, 150, 400)
    views = tta.views(image)
    assert [(v.size, v.flip) for v in views] == [
        ((100, 267), False),
        ((100, 267), True),
        ((113, 300), False),  # 240 would make the long side 640 > 300: 240 x 300 / 640 = 112.5
        ((113, 300), True),
    ]
    assert torch.equal(views[1].image, views[0].image.flip(-1))
    assert tta.base_size(150, 400) == (96, 256)  # the plain test size: 160 short, 256 long cap


def test_views_of_equal_padded_size_run_as_one_batch(model):
    """Two sizes with a flip each: two forward passes of two images (not four of one), and the
    views give the candidates they give alone (a view batched with its mirror image)."""
    tta = GFocalV2WithTTA(tta_cfg((128, 192), 400, True), model)
    batches = []
    hook = model.backbone.register_forward_pre_hook(
        lambda m, args: batches.append(tuple(args[0].shape))
    )
    try:
        image = scene(3, 200, 260)
        views = tta.views(image)
        with torch.no_grad():
            together = tta._view_candidates(views)
        assert [b[0] for b in batches] == [2, 2], batches
        for view, (boxes, scores) in zip(views, together):
            with torch.no_grad():
                (alone,) = tta._view_candidates([view])
            # the same convolutions on a batch of 2 instead of 1: a few float32 ulps apart
            torch.testing.assert_close(scores, alone[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(boxes, alone[0], rtol=1e-5, atol=1e-3)
    finally:
        hook.remove()


def test_a_batch_of_images_gives_each_image_what_it_gets_alone(model):
    tta = GFocalV2WithTTA(tta_cfg((128, 176), 300, True), model)
    images = [scene(5, 140, 230), scene(6, 260, 190)]
    with torch.no_grad():
        batch = tta([{"image": im} for im in images])
        alone = [tta([{"image": im}])[0] for im in images]
    for b, a in zip(batch, alone):
        assert len(a["instances"]) > 5
        assert same_detections(b["instances"], a["instances"])


def test_flipped_image_gives_mirrored_detections(model):
    """With FLIP the views of an image and of its mirror image are the same views in another
    order (the image is at the test size already, so its resize changes no pixel): the
    detections of the mirror image are the mirrored detections."""
    tta = GFocalV2WithTTA(tta_cfg((160,), 256, True), model)
    image = scene(7, 160, 240)
    assert torch.equal(tta.views(image)[0].image, image)  # no resampling
    with torch.no_grad():
        (a,) = tta([{"image": image}])
        (b,) = tta([{"image": image.flip(-1)}])
    a, b = a["instances"], b["instances"]
    assert len(a) == len(b) > 5
    w = 240
    mirrored = torch.stack(
        [w - a.pred_boxes.tensor[:, 2], a.pred_boxes.tensor[:, 1], w - a.pred_boxes.tensor[:, 0]]
        + [a.pred_boxes.tensor[:, 3]],
        dim=1,
    )
    # the same per-view values, batched in the other order: float32 rounding at most
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(b.pred_classes, a.pred_classes)
    torch.testing.assert_close(b.pred_boxes.tensor, mirrored, rtol=0, atol=1e-3)


def test_more_views_find_more_candidates_and_keep_the_limit(model):
    """Merging: the views' candidates go through one class-wise NMS and the model's limit."""
    limit = 15
    model = copy.deepcopy(model)
    model.max_detections_per_image = limit
    tta = GFocalV2WithTTA(tta_cfg((128, 160, 224), 400, True), model)
    image = scene(8, 210, 300)
    with torch.no_grad():
        (out,) = tta([{"image": image, "height": 420, "width": 600}])
    inst = out["instances"]
    assert inst.image_size == (420, 600)  # to the requested output size, as the plain model
    assert len(inst) == limit
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    b = inst.pred_boxes.tensor
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 600).all() and (b[:, 3] <= 420).all()
    # no two kept boxes of one class overlap above the NMS threshold
    from torchvision.ops import box_iou

    for c in inst.pred_classes.unique():
        cb = b[inst.pred_classes == c]
        iou = box_iou(cb, cb) - torch.eye(len(cb))
        assert iou.max() <= model.test_nms_thresh + 1e-6


@pytest.mark.parametrize(
    "opts, message",
    [
        (["TEST.AUG.MIN_SIZES", "()"], "TEST.AUG.MIN_SIZES is empty"),
        (["TEST.AUG.MIN_SIZES", "(400, 0)"], "[0] not a positive whole number"),
        (["TEST.AUG.MIN_SIZES", "(-5,)"], "[-5] not a positive whole number"),
        (["TEST.AUG.MIN_SIZES", "(400, 900)", "TEST.AUG.MAX_SIZE", 800], "TEST.AUG.MAX_SIZE 800"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(opts, message):
    with pytest.raises(ConfigValueError) as info:
        build_cfg("", ["TEST.AUG.ENABLED", True, *opts])
    assert message in str(info.value)
    build_cfg("", ["TEST.AUG.ENABLED", False, *opts])  # not used, not checked


def test_settings_default_to_detectron2s_and_the_base_configs_recommendation():
    from detectron2.config import get_cfg

    from gfocalv2 import add_gfocalv2_config

    cfg = get_cfg()
    add_gfocalv2_config(cfg)
    sizes, max_size, flip = tta_settings(cfg)
    assert sizes == (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
    assert max_size == 4000 and flip is True
    # configs/Base-GFocalV2.yaml: MMDetection's measured COCO views, off by default
    assert tta_settings(gfocal_cfg()) == ((800, 960), 1600, True)
    assert not gfocal_cfg().TEST.AUG.ENABLED


def test_only_for_gfocal_models():
    with pytest.raises(TypeError, match="GFocalV2"):
        GFocalV2WithTTA(gfocal_cfg(), torch.nn.Linear(2, 2))


def test_flip_of_a_model_trained_without_flips_is_warned(caplog):
    model = varied_model()
    with caplog.at_level("WARNING", logger="gfocalv2.test_time_augmentation"):
        GFocalV2WithTTA(tta_cfg((160,), 256, True, "INPUT.RANDOM_FLIP", "horizontal"), model)
        assert "TEST.AUG.FLIP" not in caplog.text
        GFocalV2WithTTA(tta_cfg((160,), 256, False, "INPUT.RANDOM_FLIP", "none"), model)
        assert "TEST.AUG.FLIP" not in caplog.text
        GFocalV2WithTTA(tta_cfg((160,), 256, True, "INPUT.RANDOM_FLIP", "none"), model)
    assert "TEST.AUG.FLIP is on but the model was trained with INPUT.RANDOM_FLIP 'none'" in (
        caplog.text
    )
