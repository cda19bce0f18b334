"""gfocalv2.convert on state dicts built here, named exactly as the sources name them.

Sources: torchvision ResNet/ResNeXt (also the naming of the open-mmlab resnext101_32x4d
release), the Res2Net v1d release (MMDetection naming ``stem.*`` and the original
``conv1.*`` + ``bn1``), and the authors' MMDetection 2.x GFocalV2/GFL checkpoints.
The converted Detectron2 model is compared with forwards written here directly from the
source tensors (functional convs on the source keys), and with torchvision itself.
"""

import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import deform_conv2d

from gfocalv2 import convert
from gfocalv2.convert import ConversionError, convert_file, load_source
from tests.utils.models import REPO

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


# ----------------------------------------------------------------------------- sources


def randomize_bn_stats(module):
    """Give every BatchNorm non-trivial statistics and affine parameters, in place."""
    g = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module


def torchvision_model(depth=50, groups=1, width=64):
    tv = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck,
        list(BLOCKS[depth]),
        groups=groups,
        width_per_group=width,
    )
    return randomize_bn_stats(tv).eval()


def bn_entries(prefix, c, g):
    return {
        f"{prefix}.weight": torch.rand(c, generator=g) + 0.5,
        f"{prefix}.bias": torch.randn(c, generator=g) * 0.1,
        f"{prefix}.running_mean": torch.randn(c, generator=g) * 0.1,
        f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(1000),
    }


def conv_w(cout, cin, k, g):
    return torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5


def offset_entries(prefix, cin, g):
    """An MMCV DeformConv2dPack offset conv (18 channels, bias), small random values."""
    return {
        f"{prefix}.conv_offset.weight": torch.randn(18, cin, 3, 3, generator=g) * 0.02,
        f"{prefix}.conv_offset.bias": torch.randn(18, generator=g) * 0.3,
    }


def mmdet_resnet_backbone(depth=50, dcn=(False, True, True, True), seed=0, groups=1, width=64):
    """MMDetection ResNet/ResNeXt (pytorch style) backbone keys: torchvision's, plus DCN
    ``conv2.conv_offset``."""
    torch.manual_seed(seed)
    tv = torchvision_model(depth, groups, width)
    g = torch.Generator().manual_seed(seed)
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    for K, nb in enumerate(BLOCKS[depth], 1):
        if dcn[K - 1]:
            for i in range(nb):
                sd.update(offset_entries(f"layer{K}.{i}.conv2", groups * width * 2 ** (K - 1), g))
    return sd


def mmdet_res2net_backbone(depth=50, scales=4, base_width=26, dcn=(False,) * 4, seed=0):
    """MMDetection Res2Net v1d backbone keys (``stem.{0,1,3,4,6,7}``, ``layerK.i.convs.j`` ...),
    random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {"stem.0.weight": conv_w(32, 3, 3, g), **bn_entries("stem.1", 32, g)}
    sd.update({"stem.3.weight": conv_w(32, 32, 3, g), **bn_entries("stem.4", 32, g)})
    sd.update({"stem.6.weight": conv_w(64, 32, 3, g), **bn_entries("stem.7", 64, g)})
    cin = 64
    for K, nb in enumerate(BLOCKS[depth], 1):
        w, out = base_width * 2 ** (K - 1), 256 * 2 ** (K - 1)
        for i in range(nb):
            p = f"layer{K}.{i}."
            sd[p + "conv1.weight"] = conv_w(w * scales, cin, 1, g)
            sd.update(bn_entries(p + "bn1", w * scales, g))
            for j in range(scales - 1):
                sd[p + f"convs.{j}.weight"] = conv_w(w, w, 3, g)
                sd.update(bn_entries(p + f"bns.{j}", w, g))
                if dcn[K - 1]:
                    sd.update(offset_entries(p + f"convs.{j}", w, g))
            sd[p + "conv3.weight"] = conv_w(out, w * scales, 1, g) * 0.3
            sd.update(bn_entries(p + "bn3", out, g))
            if i == 0:
                sd[p + "downsample.1.weight"] = conv_w(out, cin, 1, g)
                sd.update(bn_entries(p + "downsample.2", out, g))
            cin = out
    return sd


def mmdet_detector(backbone, num_out=81, reg_max=16, dgqp=True, seed=1):
    """A GFocalV2 (dgqp) / GFL MMDetection 2.x checkpoint dict around ``backbone`` keys."""
    g = torch.Generator().manual_seed(seed)
    sd = {"backbone." + k: v for k, v in backbone.items()}
    for i, cin in enumerate((512, 1024, 2048)):
        sd[f"neck.lateral_convs.{i}.conv.weight"] = conv_w(256, cin, 1, g)
        sd[f"neck.lateral_convs.{i}.conv.bias"] = torch.randn(256, generator=g) * 0.1
    for i in range(5):
        sd[f"neck.fpn_convs.{i}.conv.weight"] = conv_w(256, 256, 3, g)
        sd[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(256, generator=g) * 0.1
    for tower in ("cls_convs", "reg_convs"):
        for i in range(4):
            sd[f"bbox_head.{tower}.{i}.conv.weight"] = conv_w(256, 256, 3, g)
            sd[f"bbox_head.{tower}.{i}.gn.weight"] = torch.rand(256, generator=g) + 0.5
            sd[f"bbox_head.{tower}.{i}.gn.bias"] = torch.randn(256, generator=g) * 0.1
    sd["bbox_head.gfl_cls.weight"] = conv_w(num_out, 256, 3, g)
    sd["bbox_head.gfl_cls.bias"] = torch.randn(num_out, generator=g)
    sd["bbox_head.gfl_reg.weight"] = conv_w(4 * (reg_max + 1), 256, 3, g)
    sd["bbox_head.gfl_reg.bias"] = torch.randn(4 * (reg_max + 1), generator=g)
    for i in range(5):
        sd[f"bbox_head.scales.{i}.scale"] = torch.tensor(1.0 + 0.1 * i)
    if dgqp:
        sd["bbox_head.reg_conf.0.weight"] = conv_w(64, 20, 1, g)
        sd["bbox_head.reg_conf.0.bias"] = torch.randn(64, generator=g) * 0.1
        sd["bbox_head.reg_conf.2.weight"] = conv_w(1, 64, 1, g)
        sd["bbox_head.reg_conf.2.bias"] = torch.randn(1, generator=g) * 0.1
    sd["bbox_head.integral.project"] = torch.linspace(0, reg_max, reg_max + 1)
    meta = {"mmdet_version": "2.6.0", "CLASSES": tuple(f"class{i}" for i in range(80))}
    return {"state_dict": sd, "meta": meta}


# ----------------------------------------------------------------------------- references


def ref_bn(x, sd, p):
    return F.batch_norm(
        x,
        sd[p + ".running_mean"],
        sd[p + ".running_var"],
        sd[p + ".weight"],
        sd[p + ".bias"],
        False,
        0.0,
        1e-5,
    )


def ref_conv3x3(x, sd, p, stride):
    """MMCV ``Conv2d`` or ``DeformConv2dPack`` (if ``p.conv_offset`` exists), 3x3, padding 1, no
    bias."""
    w = sd[p + ".weight"]
    if p + ".conv_offset.weight" in sd:
        off = F.conv2d(
            x, sd[p + ".conv_offset.weight"], sd[p + ".conv_offset.bias"], stride=stride, padding=1
        )
        return deform_conv2d(x, off, w, stride=stride, padding=1)
    return F.conv2d(x, w, stride=stride, padding=1, groups=x.shape[1] // w.shape[1])


def ref_resnet(x, sd, blocks):
    """Pytorch-style ResNet(-DCN) from torchvision/MMDetection keys; returns [C2, C3, C4, C5]."""
    x = F.relu(ref_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for K, nb in enumerate(blocks, 1):
        for i in range(nb):
            p = f"layer{K}.{i}."
            stride = 2 if (i == 0 and K > 1) else 1
            y = F.relu(ref_bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
            y = F.relu(ref_bn(ref_conv3x3(y, sd, p + "conv2", stride), sd, p + "bn2"))
            y = ref_bn(F.conv2d(y, sd[p + "conv3.weight"]), sd, p + "bn3")
            if p + "downsample.0.weight" in sd:
                x = ref_bn(
                    F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride),
                    sd,
                    p + "downsample.1",
                )
            x = F.relu(y + x)
        outs.append(x)
    return outs


def ref_res2net(x, sd, blocks, scales=4):
    """MMDetection Res2Net v1d(-DCN) from its keys; returns [C2, C3, C4, C5]."""
    for conv, bn, stride in (
        ("stem.0", "stem.1", 2),
        ("stem.3", "stem.4", 1),
        ("stem.6", "stem.7", 1),
    ):
        x = F.relu(ref_bn(F.conv2d(x, sd[conv + ".weight"], stride=stride, padding=1), sd, bn))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for K, nb in enumerate(blocks, 1):
        for i in range(nb):
            p = f"layer{K}.{i}."
            stride, stage = (2 if (i == 0 and K > 1) else 1), i == 0
            y = F.relu(ref_bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
            spx = torch.split(y, y.shape[1] // scales, 1)
            parts = []
            for j in range(scales - 1):
                # parts[-1]: the previous split's output
                sp = spx[j] if (j == 0 or stage) else parts[-1] + spx[j]
                sp = F.relu(
                    ref_bn(ref_conv3x3(sp, sd, p + f"convs.{j}", stride), sd, p + f"bns.{j}")
                )
                parts.append(sp)
            parts.append(
                F.avg_pool2d(spx[-1], 3, stride, 1) if (stage and stride != 1) else spx[-1]
            )
            y = ref_bn(F.conv2d(torch.cat(parts, 1), sd[p + "conv3.weight"]), sd, p + "bn3")
            if p + "downsample.1.weight" in sd:
                x = F.avg_pool2d(x, stride, stride, ceil_mode=True, count_include_pad=False)
                x = ref_bn(F.conv2d(x, sd[p + "downsample.1.weight"]), sd, p + "downsample.2")
            x = F.relu(y + x)
        outs.append(x)
    return outs


def ref_fpn(c3, c4, c5, sd):
    """MMDetection FPN (start_level 1, add_extra_convs='on_output', no ReLU before P7): [P3..P7]."""
    lat = [
        F.conv2d(
            c, sd[f"neck.lateral_convs.{i}.conv.weight"], sd[f"neck.lateral_convs.{i}.conv.bias"]
        )
        for i, c in enumerate((c3, c4, c5))
    ]
    for i in (2, 1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
    outs = [
        F.conv2d(
            x, sd[f"neck.fpn_convs.{i}.conv.weight"], sd[f"neck.fpn_convs.{i}.conv.bias"], padding=1
        )
        for i, x in enumerate(lat)
    ]
    p6 = F.conv2d(
        outs[-1],
        sd["neck.fpn_convs.3.conv.weight"],
        sd["neck.fpn_convs.3.conv.bias"],
        stride=2,
        padding=1,
    )
    p7 = F.conv2d(
        p6,
        sd["neck.fpn_convs.4.conv.weight"],
        sd["neck.fpn_convs.4.conv.bias"],
        stride=2,
        padding=1,
    )
    return outs + [p6, p7]


def ref_head(features, sd, num_classes=80, reg_max=16):
    """The authors' GFocalV2 head from its keys: per level (cls logits (first C), box logits, DGQP
    logit)."""
    results = []
    for lvl, x in enumerate(features):
        towers = {}
        for t in ("cls_convs", "reg_convs"):
            y = x
            for i in range(4):
                y = F.conv2d(y, sd[f"bbox_head.{t}.{i}.conv.weight"], padding=1)
                y = F.relu(
                    F.group_norm(
                        y, 32, sd[f"bbox_head.{t}.{i}.gn.weight"], sd[f"bbox_head.{t}.{i}.gn.bias"]
                    )
                )
            towers[t] = y
        cls = F.conv2d(
            towers["cls_convs"],
            sd["bbox_head.gfl_cls.weight"],
            sd["bbox_head.gfl_cls.bias"],
            padding=1,
        )
        box = F.conv2d(
            towers["reg_convs"],
            sd["bbox_head.gfl_reg.weight"],
            sd["bbox_head.gfl_reg.bias"],
            padding=1,
        )
        box = box * sd[f"bbox_head.scales.{lvl}.scale"]
        q = None
        if "bbox_head.reg_conf.0.weight" in sd:
            N, _, H, W = box.shape
            prob = box.reshape(N, 4, reg_max + 1, H, W).softmax(2)
            top = prob.topk(4, dim=2).values
            stat = torch.cat([top, top.mean(2, keepdim=True)], 2).reshape(N, 20, H, W)
            q = F.relu(
                F.conv2d(stat, sd["bbox_head.reg_conf.0.weight"], sd["bbox_head.reg_conf.0.bias"])
            )
            q = F.conv2d(q, sd["bbox_head.reg_conf.2.weight"], sd["bbox_head.reg_conf.2.bias"])
        results.append((cls[:, :num_classes], box, q))
    return results


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- helpers


def save(tmp_path, name, obj):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def load_model(dst, config_file, opts=()):
    """The GFocalV2 model of ``config_file`` + ``opts`` with the converted checkpoint loaded."""
    pytest.importorskip("gfocalv2.modeling.meta_arch")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = convert.build_target_cfg(None, detector=True, config_file=config_file, opts=list(opts))
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(dst)
    return model


def assert_loaded(model, dst):
    """Every converted tensor is in the model, unchanged."""
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["matching_heuristics"] is False and "__author__" in ckpt
    state = model.state_dict()
    for k, v in ckpt["model"].items():
        assert torch.equal(state[k], v), k
    return ckpt["model"]


# ----------------------------------------------------------------------------- ImageNet


@pytest.mark.parametrize("groups,width", [(1, 64), (32, 4)], ids=["R50", "X101-32x4d"])
def test_imagenet_torchvision_resnet_matches_torchvision(tmp_path, groups, width):
    depth = 50 if groups == 1 else 101
    tv = torchvision_model(depth, groups, width)
    src = save(tmp_path, "tv.pth", tv.state_dict())
    dst = str(tmp_path / "d2.pth")
    arch = "r50" if groups == 1 else "x101-32x4d"
    report = convert_file("imagenet", src, dst, arch=arch)
    assert {k for k, _ in report.dropped if k.startswith("fc.")} == {"fc.weight", "fc.bias"}
    assert not report.problems

    from detectron2.layers import ShapeSpec

    from gfocalv2.modeling.backbone import build_gfocal_resnet_backbone

    cfg = convert.build_target_cfg(convert.detect_backbone(tv.state_dict()), detector=False)
    model = build_gfocal_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    ckpt = torch.load(dst, weights_only=True)["model"]
    assert all(k.startswith("backbone.bottom_up.") for k in ckpt)
    missing, unexpected = model.load_state_dict(
        {k[len("backbone.bottom_up.") :]: v for k, v in ckpt.items()}, strict=False
    )
    assert not unexpected and not [k for k in missing if not k.endswith("num_batches_tracked")]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for name, layer in zip(
            ("res2", "res3", "res4", "res5"), (tv.layer1, tv.layer2, tv.layer3, tv.layer4)
        ):
            y = layer(y)
            close(ours[name], y)


@pytest.mark.parametrize("naming", ["mmdet", "original"])
def test_imagenet_res2net_matches_reference(tmp_path, naming):
    sd = mmdet_res2net_backbone(50)
    src_sd = dict(sd)
    if naming == "original":  # the Res2Net authors' release: conv1.{0,1,3,4,6} + bn1
        rename = {
            "stem.0": "conv1.0",
            "stem.1": "conv1.1",
            "stem.3": "conv1.3",
            "stem.4": "conv1.4",
            "stem.6": "conv1.6",
            "stem.7": "bn1",
        }
        src_sd = {}
        for k, v in sd.items():
            head, _, rest = k.partition(".")
            key2 = f"{head}.{rest.split('.')[0]}"
            src_sd[(rename[key2] + k[len(key2) :]) if key2 in rename else k] = v
        src_sd["fc.weight"] = torch.zeros(1000, 2048)
        src_sd["fc.bias"] = torch.zeros(1000)
    src = save(tmp_path, "r2.pth", {"state_dict": src_sd})
    dst = str(tmp_path / "d2.pth")
    report = convert_file("imagenet", src, dst, arch="res2net50")
    assert not report.problems

    from detectron2.layers import ShapeSpec

    from gfocalv2.modeling.backbone import build_gfocal_res2net_backbone

    cfg = convert.build_target_cfg(convert.detect_backbone(sd), detector=False)
    model = build_gfocal_res2net_backbone(cfg, ShapeSpec(channels=3)).eval()
    ckpt = torch.load(dst, weights_only=True)["model"]
    model.load_state_dict(
        {k[len("backbone.bottom_up.") :]: v for k, v in ckpt.items()}, strict=False
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        ref = ref_res2net(x, sd, BLOCKS[50])
    for name, r in zip(("res2", "res3", "res4", "res5"), ref):
        close(ours[name], r)


# ----------------------------------------------------------------------------- detector


def test_mmdet_gfocalv2_r50_dcn_matches_reference(tmp_path):
    """R-50 with DCN v1 in c3-c5, through the repo's R-101-DCN config with DEPTH 50."""
    backbone = mmdet_resnet_backbone(50, dcn=(False, True, True, True))
    ckpt = mmdet_detector(backbone)
    src = save(tmp_path, "gfocalv2_r50_dcn.pth", ckpt)
    dst = str(tmp_path / "d2.pth")
    config = os.path.join(REPO, "configs/COCO-Detection/gfocalv2_R_101_dcnv2_FPN_ms2x.yaml")
    opts = ["MODEL.RESNETS.DEPTH", "50"]
    report = convert_file("mmdet", src, dst, config_file=config, opts=opts)
    assert not report.problems
    assert any("dropped the last one" in n for n in report.notes)
    assert "bbox_head.integral.project" in {k for k, _ in report.dropped}

    model = load_model(dst, config, opts)
    converted = assert_loaded(model, dst)
    assert converted["head.cls_score.weight"].shape[0] == 80
    sd = ckpt["state_dict"]
    bsd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        bottom = model.backbone.bottom_up(x)
        ref_c = ref_resnet(x, bsd, BLOCKS[50])
        for name, r in zip(("res3", "res4", "res5"), ref_c[1:]):
            close(bottom[name], r)
        feats = model.backbone(x)
        ref_p = ref_fpn(bottom["res3"], bottom["res4"], bottom["res5"], sd)
        for name, r in zip(("p3", "p4", "p5", "p6", "p7"), ref_p):
            close(feats[name], r)
        cls, box, quality = model.head([feats[f] for f in ("p3", "p4", "p5", "p6", "p7")])
        for lvl, (rc, rb, rq) in enumerate(ref_head(ref_p, sd)):
            close(cls[lvl], rc)
            close(box[lvl], rb)
            close(quality[lvl], rq)
            # The authors' joint score: sigmoid(cls) x sigmoid(DGQP) on the first C channels.
            close(cls[lvl].sigmoid() * quality[lvl].sigmoid(), rc.sigmoid() * rq.sigmoid())


def test_mmdet_res2net_dcn_detected_and_matches_reference(tmp_path):
    """Res2Net-50 v1d with DCN in c4-c5; the target model is built from what the source contains."""
    backbone = mmdet_res2net_backbone(50, dcn=(False, False, True, True))
    ckpt = mmdet_detector(backbone)
    src = save(tmp_path, "gfocalv2_r2_dcn.pth", ckpt)
    dst = str(tmp_path / "d2.pth")
    report = convert_file("mmdet", src, dst, arch="res2net50")
    assert not report.problems
    model = load_model(
        dst,
        os.path.join(REPO, "configs/COCO-Detection/gfocalv2_R2_101_dcnv2_FPN_ms2x.yaml"),
        ["MODEL.RESNETS.DEPTH", "50"],
    )
    assert_loaded(model, dst)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        bottom = model.backbone.bottom_up(x)
        ref_c = ref_res2net(x, backbone, BLOCKS[50])
    for name, r in zip(("res3", "res4", "res5"), ref_c[1:]):
        close(bottom[name], r)


def test_mmdet_gflv1_without_dgqp(tmp_path):
    ckpt = mmdet_detector(mmdet_resnet_backbone(50, dcn=(False,) * 4), num_out=80, dgqp=False)
    src = save(tmp_path, "gfl.pth", ckpt)
    dst = str(tmp_path / "d2.pth")
    report = convert_file("mmdet", src, dst, arch="r50")
    assert not report.problems and not any("dropped the last one" in n for n in report.notes)
    model = load_model(dst, os.path.join(REPO, "configs/COCO-Detection/gfl_R_50_FPN_1x.yaml"))
    assert model.head.dgqp is None
    assert_loaded(model, dst)
    sd = ckpt["state_dict"]
    feats = [torch.randn(1, 256, s, s) for s in (8, 4, 2, 1, 1)]
    with torch.no_grad():
        cls, box, quality = model.head(feats)
    assert quality == []
    for lvl, (rc, rb, _) in enumerate(ref_head(feats, sd)):
        close(cls[lvl], rc)
        close(box[lvl], rb)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def r50_checkpoint(tmp_path_factory):
    ckpt = mmdet_detector(mmdet_resnet_backbone(50, dcn=(False,) * 4))
    return ckpt


def test_unmatched_source_key_is_reported(tmp_path, r50_checkpoint):
    ckpt = {"state_dict": dict(r50_checkpoint["state_dict"]), "meta": r50_checkpoint["meta"]}
    ckpt["state_dict"]["bbox_head.extra_thing.weight"] = torch.zeros(3)
    src = save(tmp_path, "x.pth", ckpt)
    with pytest.raises(
        ConversionError, match=r"unmatched source key bbox_head\.extra_thing\.weight"
    ):
        convert_file("mmdet", src, str(tmp_path / "d2.pth"))
    report = convert_file("mmdet", src, str(tmp_path / "d2.pth"), strict=False)
    assert report.unmatched == ["bbox_head.extra_thing.weight"]
    assert os.path.exists(tmp_path / "d2.pth")


def test_missing_model_key_is_reported(tmp_path, r50_checkpoint):
    sd = dict(r50_checkpoint["state_dict"])
    del sd["bbox_head.scales.2.scale"]
    del sd["backbone.layer3.1.bn2.running_var"]
    src = save(tmp_path, "x.pth", {"state_dict": sd, "meta": r50_checkpoint["meta"]})
    with pytest.raises(ConversionError) as e:
        convert_file("mmdet", src, str(tmp_path / "d2.pth"))
    assert "target model key head.scales.2.scale not filled" in str(e.value)
    assert "target model key backbone.bottom_up.res4.1.conv2.norm.running_var not filled" in str(
        e.value
    )


def test_shape_mismatch_names_the_key(tmp_path, r50_checkpoint):
    sd = dict(r50_checkpoint["state_dict"])
    sd["neck.fpn_convs.1.conv.weight"] = torch.zeros(256, 256, 1, 1)
    src = save(tmp_path, "x.pth", {"state_dict": sd, "meta": r50_checkpoint["meta"]})
    with pytest.raises(
        ConversionError,
        match=r"backbone\.fpn_output4\.weight \(from source key neck\.fpn_convs\.1\.conv\.weight\)",
    ):
        convert_file("mmdet", src, str(tmp_path / "d2.pth"))


def test_classifier_channel_count_checked(tmp_path, r50_checkpoint):
    sd = dict(r50_checkpoint["state_dict"])
    src = save(tmp_path, "x.pth", {"state_dict": sd, "meta": {}})
    with pytest.raises(
        ConversionError, match=r"bbox_head\.gfl_cls\.weight: 81 output channels, expected 20"
    ):
        convert_file("mmdet", src, str(tmp_path / "d2.pth"), num_classes=20)


def test_arch_mismatch(tmp_path, r50_checkpoint):
    src = save(tmp_path, "x.pth", r50_checkpoint)
    with pytest.raises(ConversionError, match="--arch r101 does not match"):
        convert_file("mmdet", src, str(tmp_path / "d2.pth"), arch="r101")


def test_cli(tmp_path, r50_checkpoint):
    src = save(tmp_path, "x.pth", r50_checkpoint)
    dst = str(tmp_path / "d2.pth")
    assert convert.main(["mmdet", src, dst, "--arch", "r50"]) == 0
    state, _ = load_source(dst)
    assert state["head.cls_score.bias"].shape == (80,)
    assert torch.equal(
        state["head.cls_score.bias"], r50_checkpoint["state_dict"]["bbox_head.gfl_cls.bias"][:80]
    )
    assert not any(k.endswith("num_batches_tracked") for k in state)
    bad = save(tmp_path, "bad.pth", {"state_dict": {"foo.weight": torch.zeros(1)}})
    assert convert.main(["mmdet", bad, dst]) == 1


PUBLISHED = {
    # config: (backbone family, depth, groups, width, DCN stages, GFLV2)
    "gfl_R_50_FPN_1x.yaml": ("resnet", 50, 1, 64, (False,) * 4, False),
    "gfocalv2_R_50_FPN_1x.yaml": ("resnet", 50, 1, 64, (False,) * 4, True),
    "gfocalv2_R_50_FPN_ms2x.yaml": ("resnet", 50, 1, 64, (False,) * 4, True),
    "gfocalv2_R_101_FPN_ms2x.yaml": ("resnet", 101, 1, 64, (False,) * 4, True),
    "gfocalv2_R_101_dcnv2_FPN_ms2x.yaml": ("resnet", 101, 1, 64, (False, True, True, True), True),
    "gfocalv2_X_101_dcnv2_FPN_ms2x.yaml": ("resnet", 101, 32, 4, (False, False, True, True), True),
    "gfocalv2_R2_101_dcnv2_FPN_ms2x.yaml": (
        "res2net",
        101,
        1,
        26,
        (False, False, True, True),
        True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(PUBLISHED))
def test_published_configs_take_the_reference_architecture(tmp_path, config):
    """A checkpoint shaped like the authors' release for each row converts into its config with no
    gaps."""
    family, depth, groups, width, dcn, v2 = PUBLISHED[config]
    if family == "res2net":
        backbone = mmdet_res2net_backbone(depth, dcn=dcn)
    else:
        backbone = mmdet_resnet_backbone(depth, dcn=dcn, groups=groups, width=width)
    src = save(tmp_path, "src.pth", mmdet_detector(backbone, num_out=81 if v2 else 80, dgqp=v2))
    path = os.path.join(REPO, "configs/COCO-Detection", config)
    report = convert_file("mmdet", src, str(tmp_path / "dst.pth"), config_file=path)
    assert not report.problems
    # Without a config, the detected architecture gives the same model keys.
    report2 = convert_file("mmdet", src, str(tmp_path / "dst2.pth"))
    assert not report2.problems
    assert dict(report.converted) == dict(report2.converted)


def test_imagenet_into_deformable_config_keeps_zero_offsets(tmp_path):
    src = save(tmp_path, "tv.pth", torchvision_model(50).state_dict())
    config = os.path.join(REPO, "configs/COCO-Detection/gfocalv2_R_101_dcnv2_FPN_ms2x.yaml")
    report = convert_file(
        "imagenet",
        src,
        str(tmp_path / "d2.pth"),
        config_file=config,
        opts=["MODEL.RESNETS.DEPTH", "50"],
    )
    assert not report.problems
    assert any("conv2_offset" in n and "zero init" in n for n in report.notes)
