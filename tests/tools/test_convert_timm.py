"""``python -m gfocalv2.convert timm``: timm checkpoints (random values, saved as timm saves them)
-> Detectron2 checkpoints that load into a GFocalV2 model with ``build_timm_fpn_backbone``.

The loaded parameters are compared with the source tensors through a mapping written here
(timm's feature extractors keep the classification model's names, except FeatureListNet's
flattened top-level modules: ``stem.0`` -> ``stem_0``, ``stages.1`` -> ``stages_1``)."""

import argparse
import os
import re

import pytest
import torch

from gfocalv2 import convert
from gfocalv2.convert import ConversionError, convert_file
from tests.utils.models import BASE_CONFIG

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

PREFIX = "backbone.bottom_up.model."
# the classification layers that timm's feature extractor of each model leaves out
HEAD = {
    "convnext_atto": ("head.",),  # FeatureListNet: stem_0, stages_0.. (renamed)
    "mobilenetv3_small_050": ("conv_head.", "classifier."),  # MobileNetV3Features: same names
    "efficientnet_b1": ("conv_head.", "bn2.", "classifier."),
}


def timm_state(name, seed=0, **kwargs):
    """The full classification state dict (head included) of ``timm.create_model(name,
    **kwargs)``, every floating-point tensor made distinct (no constant initialization left)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = v + 0.01 * torch.randn(v.shape, generator=g)
        state[k] = v.contiguous()
    return state


def save_checkpoint(path, state, fmt, other=None):
    """``state`` as timm users have it: a model.safetensors, a plain .pth state dict, a timm
    training checkpoint (``state_dict`` + ``args`` Namespace), or one with EMA weights."""
    path = str(path)
    if fmt == "safetensors":
        safetensors_torch.save_file(state, path)
    elif fmt == "pth":
        torch.save(state, path)
    elif fmt == "pth-train":
        args = argparse.Namespace(model="x", lr=0.1)
        torch.save({"epoch": 3, "arch": "x", "state_dict": state, "args": args}, path)
    elif fmt == "pth-ema":  # timm (load_checkpoint, pretrained loads) takes the EMA weights
        torch.save({"state_dict": other, "state_dict_ema": state}, path)
    else:
        raise ValueError(fmt)
    return path


def source_key(features_key, state):
    """The source key of a feature-extractor key, mapped independently of the converter."""
    if features_key in state:
        return features_key
    key = re.sub(r"^([A-Za-z]+)_(\d+)\.", r"\1.\2.", features_key)
    assert key in state, features_key
    return key


def timm_model(name, *opts):
    """The GFocalV2 model with the timm backbone ``name`` (random init), and its config."""
    from detectron2.modeling import build_model

    from gfocalv2.engine import build_cfg

    cfg = build_cfg(
        BASE_CONFIG,
        [
            "MODEL.BACKBONE.NAME",
            "build_timm_fpn_backbone",
            "MODEL.TIMM.NAME",
            name,
            "MODEL.DEVICE",
            "cpu",
            "MODEL.BACKBONE.FREEZE_AT",
            "0",
            *opts,
        ],
    )
    return build_model(cfg).eval(), cfg


def check_loaded(name, dst, state):
    """``dst`` loaded the way train_net loads MODEL.WEIGHTS: every parameter and buffer of the
    timm feature extractor is the source tensor it came from; only the FPN and head are left."""
    from gfocalv2.checkpoint import checkpointer_for

    model, cfg = timm_model(name, "MODEL.WEIGHTS", dst)
    bottom_up = model.backbone.bottom_up.model
    before = {k: v.clone() for k, v in bottom_up.state_dict().items()}
    checkpointer_for(cfg, model).load(cfg.MODEL.WEIGHTS)

    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["matching_heuristics"] is False and name in ckpt["__author__"]
    assert set(ckpt["model"]) == {PREFIX + k for k in bottom_up.state_dict()}
    used = set()
    for k, v in bottom_up.state_dict().items():
        src = source_key(k, state)
        used.add(src)
        assert torch.equal(v, state[src].to(v.dtype)), k
        if v.is_floating_point() and v.numel() > 1:
            assert not torch.equal(v, before[k]), f"{k} kept its initialization"
    left = set(state) - used
    assert left and all(k.startswith(HEAD[name]) for k in left), sorted(left)
    return left


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    "name,fmt,kwargs",
    [
        ("convnext_atto", "safetensors", {}),
        ("convnext_atto", "pth", {"num_classes": 10}),  # fine-tuned on another dataset
        ("mobilenetv3_small_050", "pth-train", {}),
        ("mobilenetv3_small_050", "pth-ema", {}),
    ],
)
def test_timm_checkpoint_loads_into_the_timm_backbone(tmp_path, name, fmt, kwargs):
    state = timm_state(name, **kwargs)
    other = timm_state(name, seed=5) if fmt == "pth-ema" else None
    fname = {"safetensors": "model.safetensors", "pth-ema": "pytorch_model.bin"}.get(fmt, "m.pth")
    src = save_checkpoint(tmp_path / fname, state, fmt, other)
    dst = str(tmp_path / "d2.pth")
    report = convert_file("timm", src, dst, name=name)
    assert not report.problems
    left = check_loaded(name, dst, state)
    # the report names the checkpoint tensors left out, and where each converted one came from
    assert {k for k, _ in report.dropped} == left
    assert all(source_key(t[len(PREFIX) :], state) == s for s, t in report.converted)


def test_timm_cli(tmp_path):
    """The command line of the README: options after the positional arguments."""
    name = "convnext_atto"
    state = timm_state(name)
    src = save_checkpoint(tmp_path / "model.safetensors", state, "safetensors")
    dst = str(tmp_path / "d2.pth")
    assert convert.main(["timm", src, dst, "--name", name]) == 0
    check_loaded(name, dst, state)
    assert convert.main(["timm", "--name", name, src, str(tmp_path / "d2b.pth")]) == 0


def test_timm_name_from_config_file(tmp_path):
    name = "convnext_atto"
    src = save_checkpoint(tmp_path / "model.safetensors", timm_state(name), "safetensors")
    config = tmp_path / "timm.yaml"
    config.write_text(
        f'_BASE_: "{BASE_CONFIG}"\n'
        "MODEL:\n"
        "  BACKBONE: {NAME: build_timm_fpn_backbone}\n"
        f"  TIMM: {{NAME: {name}}}\n"
    )
    dst = str(tmp_path / "d2.pth")
    assert convert.main(["timm", src, dst, "--config-file", str(config)]) == 0
    assert set(torch.load(dst, weights_only=True)["model"]) == {
        PREFIX + k for k in timm_model(name)[0].backbone.bottom_up.model.state_dict()
    }
    # --name must agree with the config (a pretrained tag aside); the config must use the timm
    # backbone
    assert convert.main(["timm", src, dst, "--config-file", str(config), "--name", name]) == 0
    assert (
        convert.main(
            ["timm", src, dst, "--config-file", str(config), "--name", "convnext_atto.d2_in1k"]
        )
        == 0
    )
    with pytest.raises(ConversionError, match="--name convnext_femto differs from MODEL.TIMM.NAME"):
        convert_file("timm", src, dst, name="convnext_femto", config_file=str(config))
    with pytest.raises(ConversionError, match="build_gfocal_resnet_fpn_backbone"):
        convert_file("timm", src, dst, name=name, config_file=BASE_CONFIG)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "saved,name,problem",
    [
        ("efficientnet_b1", "efficientnet_b0", "Unexpected key"),  # b0's keys all in b1's file
        ("convnext_atto", "convnext_femto", "size mismatch"),
        ("mobilenetv3_small_050", "convnext_atto", r"0 of the file's \d+ tensor names"),
    ],
)
def test_timm_checkpoint_of_another_model_is_refused(tmp_path, saved, name, problem):
    src = save_checkpoint(tmp_path / "model.safetensors", timm_state(saved), "safetensors")
    dst = tmp_path / "d2.pth"
    dst.write_bytes(b"previous")
    with pytest.raises(ConversionError) as e:
        convert_file("timm", src, str(dst), name=name)
    msg = str(e.value)
    assert f"{src} does not match the timm model '{name}'" in msg
    assert re.search(problem, msg) and "--name" in msg
    assert dst.read_bytes() == b"previous"  # nothing written, no temporary file left
    assert set(os.listdir(tmp_path)) == {"model.safetensors", "d2.pth"}


def test_timm_missing_or_unreadable_file(tmp_path):
    dst = tmp_path / "d2.pth"
    missing = str(tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match=f"{re.escape(missing)} does not exist"):
        convert_file("timm", missing, str(dst), name="convnext_atto")
    assert convert.main(["timm", missing, str(dst), "--name", "convnext_atto"]) == 1
    for fname in ("notes.safetensors", "notes.pth"):
        bad = tmp_path / fname
        bad.write_text("not a checkpoint\n")
        with pytest.raises(ConversionError, match=f"{re.escape(str(bad))} is not a checkpoint"):
            convert_file("timm", str(bad), str(dst), name="convnext_atto")
    not_tensors = tmp_path / "list.pth"
    torch.save([1, 2], str(not_tensors))
    with pytest.raises(ConversionError, match="list.pth is not a checkpoint timm can read"):
        convert_file("timm", str(not_tensors), str(dst), name="convnext_atto")
    assert not dst.exists()


def test_timm_name_required_and_checked(tmp_path):
    src = save_checkpoint(tmp_path / "m.pth", timm_state("mobilenetv3_small_050"), "pth")
    dst = str(tmp_path / "d2.pth")
    with pytest.raises(ConversionError, match="kind timm needs --name"):
        convert_file("timm", src, dst)
    assert convert.main(["timm", src, dst]) == 1
    with pytest.raises(ConversionError, match="'convnext_atoo' is not a timm .* convnext_atto"):
        convert_file("timm", src, dst, name="convnext_atoo")
    with pytest.raises(ConversionError, match="kind timm takes --name"):
        convert_file("timm", src, dst, name="mobilenetv3_small_050", arch="r50")
    with pytest.raises(ConversionError, match="--name is for kind timm"):
        convert_file("imagenet", src, dst, name="resnet50")
    assert not os.path.exists(dst)


def test_options_after_positionals_are_honoured(tmp_path):
    """``SRC DST --arch r50`` (the README's order) checks the architecture: the options are not
    taken as config overrides."""
    import torchvision

    src = str(tmp_path / "r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), src)
    assert convert.main(["imagenet", src, str(tmp_path / "d2.pth"), "--arch", "r50"]) == 1
    assert not (tmp_path / "d2.pth").exists()
    assert convert.main(["imagenet", src, str(tmp_path / "d2.pth"), "--arch", "r18"]) == 0
