"""The exact inference rewrites: BatchNorm folding and the channels-last memory format."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model

from gfocalv2.modeling.backbone.resnet import DeformConv2d, EvalBatchNorm2d
from gfocalv2.modeling.inference_optimization import (
    fold_batchnorm,
    has_folded_batchnorm,
    optimize_for_inference,
    optimized_copy,
    resolve_memory_format,
)

from tests.utils.models import REPO, gfocal_cfg


def _randomize_statistics(module, g):
    """Non-trivial running statistics and affine parameters for every BatchNorm-like norm."""
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))


def _conv_then_norm_reference(x, weight, bias, mean, var, gamma, beta, eps, **conv_kwargs):
    """The unfolded computation in float64: conv, then (y - mean) / sqrt(var + eps) * gamma +
    beta."""
    y = F.conv2d(
        x.double(), weight.double(), None if bias is None else bias.double(), **conv_kwargs
    )
    shape = (1, -1, 1, 1)
    return (y - mean.double().view(shape)) / torch.sqrt(
        var.double().view(shape) + eps
    ) * gamma.double().view(shape) + beta.double().view(shape)


@pytest.mark.parametrize("norm_cls", [FrozenBatchNorm2d, EvalBatchNorm2d, nn.BatchNorm2d])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_folded_conv_equals_conv_then_norm(norm_cls, conv_bias):
    g = torch.Generator().manual_seed(1)
    conv = Conv2d(5, 7, 3, stride=2, padding=1, bias=conv_bias, norm=norm_cls(7), activation=F.relu)
    _randomize_statistics(conv, g)
    if conv_bias:
        conv.bias.data.copy_(torch.randn(7, generator=g))
    conv.eval()
    norm = conv.norm
    x = torch.randn(2, 5, 11, 9, generator=g)
    expected = F.relu(
        _conv_then_norm_reference(
            x,
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            norm.eps,
            stride=2,
            padding=1,
        )
    )
    before = conv(x)
    assert fold_batchnorm(conv) == 1
    assert conv.norm is None and conv.bias is not None
    after = conv(x)
    torch.testing.assert_close(before.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-5)


def test_deformable_conv_with_norm_is_folded():
    g = torch.Generator().manual_seed(2)
    conv = DeformConv2d(4, 6, 3, padding=1, norm=FrozenBatchNorm2d(6))
    _randomize_statistics(conv, g)
    conv.eval()
    x = torch.randn(1, 4, 8, 8, generator=g)
    offset = torch.randn(1, 18, 8, 8, generator=g) * 2
    mask = torch.rand(1, 9, 8, 8, generator=g)
    before = conv(x, offset, mask)
    assert fold_batchnorm(conv) == 1
    torch.testing.assert_close(conv(x, offset, mask), before, rtol=1e-5, atol=1e-5)


def test_statistics_dependent_norms_are_not_folded():
    gn = Conv2d(4, 32, 3, padding=1, bias=False, norm=nn.GroupNorm(8, 32))
    bn_train = Conv2d(4, 8, 3, padding=1, bias=False, norm=nn.BatchNorm2d(8))
    model = nn.Sequential(gn, bn_train).eval()
    bn_train.norm.train()  # a BatchNorm that normalizes with batch statistics
    assert fold_batchnorm(model) == 0
    assert isinstance(gn.norm, nn.GroupNorm) and isinstance(bn_train.norm, nn.BatchNorm2d)


def test_folding_a_training_model_is_refused():
    conv = Conv2d(3, 4, 1, norm=FrozenBatchNorm2d(4))
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(conv.train())


@pytest.fixture(scope="module")
def bn_model_and_images():
    torch.manual_seed(0)
    cfg = gfocal_cfg(
        "MODEL.RESNETS.NORM", "BNEval", "MODEL.GFOCAL.SCORE_THRESH_TEST", 0.0, tiny=True
    )
    model = build_model(cfg).eval()
    _randomize_statistics(model, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    images = [{"image": torch.rand(3, 96, 128, generator=g) * 255} for _ in range(2)]
    return cfg, model, images


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_optimized_model_gives_the_same_outputs_and_detections(bn_model_and_images, memory_format):
    cfg, model, images = bn_model_and_images
    optimized = optimize_for_inference(copy.deepcopy(model), cfg, memory_format=memory_format)
    norms = sum(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in optimized.modules())
    assert norms == 0  # every backbone BatchNorm folded (FREEZE_AT 0: all BNEval)
    with torch.no_grad():
        x = model.preprocess_image(images).tensor
        feats, feats_opt = model.backbone(x), optimized.backbone(x)
        for k in feats:
            scale = feats[k].abs().max()  # float32 rounding, relative to the activations' scale
            assert (feats_opt[k] - feats[k]).abs().max() <= 1e-5 * scale, k
            layout = (
                torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
            )
            assert feats_opt[k].is_contiguous(memory_format=layout), k
        head = model.head([feats[f] for f in model.head_in_features])
        head_opt = optimized.head([feats_opt[f] for f in model.head_in_features])
        for a, b in zip(head, head_opt):
            for t, t_opt in zip(a, b):
                assert (t_opt - t).abs().max() <= 1e-5 * t.abs().max()
        out, out_opt = model(images), optimized(images)
    for r, r_opt in zip(out, out_opt):
        a, b = r["instances"], r_opt["instances"]
        # Scores agree to float rounding; the lists agree except where two candidates' scores
        # are within rounding of each other (at the score threshold, the top-k or NMS).
        n = min(len(a), len(b))
        assert n >= 50 and abs(len(a) - len(b)) <= 2
        torch.testing.assert_close(b.scores[:n], a.scores[:n], rtol=1e-4, atol=1e-5)
        box_diff = (a.pred_boxes.tensor[:n] - b.pred_boxes.tensor[:n]).abs().amax(1)
        same = (a.pred_classes[:n] == b.pred_classes[:n]) & box_diff.lt(1e-2)
        assert same.float().mean() > 0.9


def test_channels_last_weights(bn_model_and_images):
    cfg, model, _ = bn_model_and_images
    optimized = optimize_for_inference(copy.deepcopy(model), cfg, memory_format="channels_last")
    conv = optimized.backbone.bottom_up.stem.conv1
    assert (
        conv.weight.is_contiguous(memory_format=torch.channels_last)
        and not conv.weight.is_contiguous()
    )


def test_optimized_copy_leaves_the_training_model_alone(bn_model_and_images):
    cfg, model, _ = bn_model_and_images
    model.train()
    keys = set(model.state_dict())
    weight = model.backbone.bottom_up.stem.conv1.weight.detach().clone()
    copy_ = optimized_copy(model, cfg)
    assert copy_ is not model and not copy_.training and model.training
    assert set(model.state_dict()) == keys
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, weight)
    assert model.backbone.bottom_up.stem.conv1.norm is not None
    model.eval()


def test_config_defaults_and_memory_format_choices():
    cfg = gfocal_cfg()
    assert cfg.TEST.FOLD_BATCHNORM is True and cfg.TEST.MEMORY_FORMAT == "auto"
    assert resolve_memory_format("auto", "cpu") == "channels_last"
    assert resolve_memory_format("auto", "cuda") == "contiguous"
    assert resolve_memory_format("contiguous", "cpu") == "contiguous"
    with pytest.raises(ValueError, match="TEST.MEMORY_FORMAT must be one of"):
        resolve_memory_format("nhwc", "cpu")


def test_bad_memory_format_fails_when_the_config_is_built():
    from gfocalv2.engine import build_cfg

    with pytest.raises(ValueError, match="TEST.MEMORY_FORMAT must be one of .*'nhwc'"):
        build_cfg(
            f"{REPO}/configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml",
            ["TEST.MEMORY_FORMAT", "nhwc"],
        )
    cfg = build_cfg(
        f"{REPO}/configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml",
        ["TEST.MEMORY_FORMAT", "contiguous"],
    )
    assert cfg.TEST.MEMORY_FORMAT == "contiguous"


def test_switches_off(bn_model_and_images):
    cfg, model, _ = bn_model_and_images
    cfg = cfg.clone()
    cfg.TEST.FOLD_BATCHNORM = False
    cfg.TEST.MEMORY_FORMAT = "contiguous"
    assert optimized_copy(model, cfg) is model  # nothing to do: no copy
    untouched = optimize_for_inference(copy.deepcopy(model), cfg)
    assert set(untouched.state_dict()) == set(model.state_dict())
    assert untouched.backbone.bottom_up.stem.conv1.weight.is_contiguous()


def test_checkpointer_refuses_a_folded_model(bn_model_and_images, tmp_path):
    from gfocalv2.checkpoint import CheckpointError, GFocalCheckpointer

    cfg, model, _ = bn_model_and_images
    GFocalCheckpointer(model, str(tmp_path)).save("model_plain")
    optimized = optimize_for_inference(copy.deepcopy(model), cfg)
    with pytest.raises(
        CheckpointError, match="optimized for inference.*build a new model or Predictor"
    ):
        GFocalCheckpointer(optimized).load(str(tmp_path / "model_plain.pth"))
    with pytest.raises(CheckpointError, match="Cannot save checkpoint model_folded"):
        GFocalCheckpointer(optimized, str(tmp_path)).save("model_folded")
    assert not (tmp_path / "model_folded.pth").exists()
    GFocalCheckpointer(copy.deepcopy(model)).load(
        str(tmp_path / "model_plain.pth")
    )  # unoptimized: fine


def test_conv_then_norm_in_a_sequential_is_folded_with_its_activation_kept():
    """A plain conv followed by a fixed-statistics BatchNorm in an nn.Sequential (a BatchNorm
    head's towers, timm's fused BatchNormAct2d) folds; a weight-standardized conv does not."""
    from timm.layers import BatchNormAct2d, ScaledStdConv2d

    torch.manual_seed(0)

    def with_statistics(norm):
        with torch.no_grad():
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.2)
        return norm

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        with_statistics(nn.BatchNorm2d(8)),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        with_statistics(BatchNormAct2d(8, act_layer=nn.ReLU)),
        ScaledStdConv2d(8, 8, 3, padding=1),
        with_statistics(nn.BatchNorm2d(8)),
    ).eval()
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorm(model) == 2
        got = model(x)
    assert isinstance(model[1], nn.Identity)
    assert isinstance(model[4], nn.Sequential) and isinstance(model[4][-1], nn.ReLU)
    assert isinstance(model[6], nn.BatchNorm2d)  # after a weight-standardized conv: kept
    assert has_folded_batchnorm(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
