"""timm feature extractors as GFocalV2 backbones (``build_timm_fpn_backbone``): levels from
timm's ``feature_info``, FREEZE_AT, norms, odd input sizes, a training step, ONNX export, and
the errors a user can cause."""

import pytest
import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from gfocalv2.export import compare_detections, export_onnx, load_runner, pytorch_detections
from gfocalv2.modeling.backbone import TimmBackbone, TimmBackboneError, build_timm_fpn_backbone
from gfocalv2.modeling.norms import per_process_batch_norms
from tests.tools.test_export import scene
from tests.utils.models import gfocal_cfg

#: The models the issue names, one of each family (ResNet, ConvNeXt, EfficientNet, MobileNet,
#: RegNet).
MODELS = ["resnet50", "convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100", "regnety_016"]
ODD_SIZES = [(97, 301), (161, 77)]


def timm_cfg(name, *opts):
    """The published base config (BNEval, FREEZE_AT 2, GN head) with a timm backbone and a
    head shrunk for CPU tests."""
    return gfocal_cfg(
        "MODEL.BACKBONE.NAME",
        "build_timm_fpn_backbone",
        "MODEL.TIMM.NAME",
        name,
        "MODEL.FPN.OUT_CHANNELS",
        32,
        "MODEL.GFOCAL.NUM_CONVS",
        1,
        "MODEL.GFOCAL.NUM_CLASSES",
        3,
        "MODEL.PIXEL_STD",
        [50.0, 50.0, 50.0],
        *opts,
    )


def varied(model):
    """Scores that vary from place to place, as a trained model's (a fresh head's are all
    about 0.01): dozens of detections to compare."""
    with torch.no_grad():
        model.head.cls_score.weight.normal_(0.0, 0.05)
        model.head.cls_score.bias.fill_(-1.5)
    return model


@pytest.fixture(scope="module", params=MODELS)
def built(request):
    torch.manual_seed(0)
    return request.param, varied(build_model(timm_cfg(request.param)))


def expected_levels(name):
    """{"res<k>": (channels, stride)} from timm's own feature_info, the deepest feature of each
    stride 8, 16, 32."""
    info = timm.create_model(name, features_only=True).feature_info
    levels = {}
    for channels, stride in zip(info.channels(), info.reduction()):
        if stride in (8, 16, 32):
            levels[f"res{stride.bit_length() - 1}"] = (channels, stride)
    return levels


def test_feature_levels_come_from_timm_feature_info(built):
    name, model = built
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, TimmBackbone)
    shapes = bottom_up.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == expected_levels(name)
    fpn = model.backbone.output_shape()
    assert [fpn[f].stride for f in ["p3", "p4", "p5", "p6", "p7"]] == [8, 16, 32, 64, 128]
    assert model.backbone.size_divisibility == 32


def test_detects_at_odd_sizes_as_timm_computes_the_features(built):
    name, model = built
    model.eval()
    reference = timm.create_model(name, features_only=True).eval()
    reference.load_state_dict(model.backbone.bottom_up.model.state_dict())
    for h, w in ODD_SIZES:
        image = scene(3, h, w)[0]
        with torch.no_grad():
            instances = model([{"image": image}])[0]["instances"]
            padded = torch.nn.functional.pad(
                (image - model.pixel_mean) / model.pixel_std, (0, -w % 32, 0, -h % 32)
            )[None]
            ours = model.backbone.bottom_up(padded)
            theirs = reference(padded)
        for level, feature in ours.items():
            stride = model.backbone.bottom_up.output_shape()[level].stride
            match = [f for f in theirs if f.shape[-1] == padded.shape[-1] // stride]
            assert feature.shape[-2:] == (-(-h // 32) * 32 // stride, -(-w // 32) * 32 // stride)
            assert torch.equal(feature, match[-1]), (name, level)
        boxes = instances.pred_boxes.tensor
        assert len(boxes) >= 10, (name, (h, w))
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_a_training_step_reaches_the_backbone_and_keeps_frozen_layers_frozen(built):
    name, model = built
    model.train()
    bottom_up = model.backbone.bottom_up.model
    # BNEval: statistics fixed in training mode too, so a multi-process run is allowed.
    assert per_process_batch_norms(model) == []
    stats = {k: v.clone() for k, v in bottom_up.state_dict().items() if "running" in k}
    before = {n: p.detach().clone() for n, p in bottom_up.named_parameters()}
    instances = Instances((97, 133))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 5.0, 120.0, 90.0]]))
    instances.gt_classes = torch.tensor([0, 2])
    losses = model([{"image": scene(4, 97, 133)[0], "instances": instances}])
    total = sum(losses.values())
    assert torch.isfinite(total)
    model.zero_grad()
    total.backward()
    trainable = [(n, p) for n, p in bottom_up.named_parameters() if p.requires_grad]
    frozen = [n for n, p in bottom_up.named_parameters() if not p.requires_grad]
    assert trainable and frozen  # FREEZE_AT 2 of the published config
    # Every trainable backbone parameter gets a gradient (DistributedDataParallel needs it), and
    # the deepest stage a nonzero one.
    assert [n for n, p in trainable if p.grad is None] == []
    assert sum(p.grad.abs().sum() for _, p in trainable[-5:]) > 0
    assert all(p.grad is None for n, p in bottom_up.named_parameters() if n in frozen)
    with torch.no_grad():
        model([{"image": scene(5, 97, 133)[0], "instances": instances}])
    for key, value in bottom_up.state_dict().items():
        if key in stats:
            assert torch.equal(value, stats[key]), key
    for n, p in bottom_up.named_parameters():
        assert torch.equal(p, before[n]), n


def test_exports_to_onnx_and_runs_any_size(built, tmp_path):
    name, model = built
    model.eval()
    run = load_runner(export_onnx(model, scene(0, 160, 192), str(tmp_path / f"{name}.onnx")))
    for h, w in ODD_SIZES:
        image = scene(1, h, w)
        expected = pytorch_detections(model, image)
        assert len(expected[0]) >= 10
        assert compare_detections(expected, run(image, model.test_score_thresh)) is None, (h, w)


def frozen_names(name, freeze_at):
    backbone = TimmBackbone(name, ["res3", "res4", "res5"], freeze_at=freeze_at)
    return {n for n, p in backbone.model.named_parameters() if not p.requires_grad}


def under(names, *prefixes):
    return {n for n in names if n.startswith(tuple(p + "." for p in prefixes))}


def test_freeze_at_means_what_it_means_for_resnet():
    all_names = {n for n, _ in timm.create_model("resnet50", features_only=True).named_parameters()}
    # Detectron2's ResNet: 1 = the stem (conv1 + bn1), 2 = stem + res2, 3 = ... + res3.
    assert frozen_names("resnet50", 0) == set()
    assert frozen_names("resnet50", 1) == under(all_names, "conv1", "bn1")
    assert frozen_names("resnet50", 2) == under(all_names, "conv1", "bn1", "layer1")
    assert frozen_names("resnet50", 3) == under(all_names, "conv1", "bn1", "layer1", "layer2")
    # ConvNeXt: a patchify stem, then stages at strides 4, 8, 16, 32.
    names = {
        n for n, _ in timm.create_model("convnext_tiny", features_only=True).named_parameters()
    }
    assert frozen_names("convnext_tiny", 1) == under(names, "stem_0", "stem_1")
    assert frozen_names("convnext_tiny", 2) == under(names, "stem_0", "stem_1", "stages_0")
    # EfficientNet: the stem is every layer before the stride-4 stage (blocks.1).
    names = {
        n for n, _ in timm.create_model("efficientnet_b0", features_only=True).named_parameters()
    }
    assert frozen_names("efficientnet_b0", 1) == under(names, "conv_stem", "bn1", "blocks.0")
    with pytest.raises(TimmBackboneError, match="FREEZE_AT 6.*stride 64"):
        frozen_names("resnet50", 6)


def test_norms():
    def bns(backbone):
        return [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    frozen = TimmBackbone("resnet18", ["res5"], norm="FrozenBN").train()
    assert all(not m.training and not m.weight.requires_grad for m in bns(frozen))
    trained = TimmBackbone("resnet18", ["res5"], norm="BN", freeze_at=2).train()
    modes = {
        n: m.training
        for n, m in trained.model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }
    assert not modes["bn1"] and not modes["layer1.0.bn1"] and modes["layer2.0.bn1"]
    assert per_process_batch_norms(trained) and not per_process_batch_norms(trained.eval())
    evaluated = TimmBackbone("resnet18", ["res5"], norm="BNEval").train()
    assert all(not m.training and m.weight.requires_grad for m in bns(evaluated))
    with pytest.raises(TimmBackboneError, match="MODEL.TIMM.NORM 'GN'.*BNEval"):
        TimmBackbone("resnet18", ["res5"], norm="GN")


def test_naive_sync_batchnorm_keeps_timm_fused_activations_and_keys():
    """From scratch with several CPU processes: Detectron2's NaiveSyncBatchNorm (which is
    BatchNorm with one process) in place of timm's BatchNormAct2d, activation kept."""
    torch.manual_seed(0)
    plain = TimmBackbone("mobilenetv3_large_100", ["res3", "res4", "res5"], norm="BN")
    synced = TimmBackbone("mobilenetv3_large_100", ["res3", "res4", "res5"], norm="naiveSyncBN")
    assert set(synced.state_dict()) == set(plain.state_dict())
    synced.load_state_dict(plain.state_dict())
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in synced.modules())
    x = torch.randn(2, 3, 64, 96)
    for mode in (True, False):
        with torch.no_grad():
            a, b = plain.train(mode)(x), synced.train(mode)(x)
        for level in a:
            torch.testing.assert_close(a[level], b[level], rtol=0, atol=0)
    assert per_process_batch_norms(plain.train()) and not per_process_batch_norms(synced.train())


def test_pretrained_weights_are_not_downloaded_when_model_weights_are_given(monkeypatch):
    calls = []
    create = timm.create_model

    def record(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", record)
    cfg = timm_cfg("resnet18", "MODEL.TIMM.PRETRAINED", True, "MODEL.WEIGHTS", "model.pth")
    build_timm_fpn_backbone(cfg, ShapeSpec(channels=3))
    cfg = timm_cfg("resnet18", "MODEL.TIMM.PRETRAINED", True)
    build_timm_fpn_backbone(cfg, ShapeSpec(channels=3))
    assert calls == [False, True]


def test_a_model_with_a_fixed_input_size_is_built_for_any_size():
    backbone = TimmBackbone("swin_tiny_patch4_window7_224", ["res3", "res4", "res5"]).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 96, 160))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res3": (1, 192, 12, 20),
        "res4": (1, 384, 6, 10),
        "res5": (1, 768, 3, 5),
    }


def test_errors_name_the_model_and_what_to_do(monkeypatch):
    cfg = timm_cfg("convnext_tinny")
    with pytest.raises(TimmBackboneError, match="'convnext_tinny' is not a timm.*convnext_tiny"):
        build_timm_fpn_backbone(cfg, ShapeSpec(channels=3))
    cfg = timm_cfg("")
    with pytest.raises(TimmBackboneError, match="MODEL.TIMM.NAME is empty"):
        build_timm_fpn_backbone(cfg, ShapeSpec(channels=3))
    # A plain ViT has features at one stride only; LeViT none at stride 8.
    with pytest.raises(TimmBackboneError, match=r"strides \[16, 16, 16\].*'res3'"):
        TimmBackbone("vit_tiny_patch16_224", ["res3", "res4", "res5"])
    with pytest.raises(TimmBackboneError, match=r"strides \[16, 32, 64\]"):
        TimmBackbone("levit_128", ["res3", "res4", "res5"])

    def no_features(name, **kwargs):  # what older timm versions raise for such models
        raise RuntimeError(f"features_only not implemented for {name}")

    monkeypatch.setattr(timm, "create_model", no_features)
    with pytest.raises(TimmBackboneError, match="cannot build 'resnet18' as a feature extractor"):
        TimmBackbone("resnet18", ["res5"])
