r"""Convert published weights into Detectron2 checkpoints for gfocalv2.

Three sources::

    python -m gfocalv2.convert mmdet    SRC.pth DST.pth [--arch r101] [--config-file CFG.yaml] \
        [--num-classes 80]
    python -m gfocalv2.convert imagenet SRC.pth DST.pth [--arch r50|r101|x101-32x4d|res2net101]
    python -m gfocalv2.convert timm     SRC.safetensors DST.pth --name convnext_tiny

``mmdet``
    The authors' released GFocalV2 / GFL checkpoints: MMDetection 2.x files
    ``{"state_dict": ..., "meta": ...}`` with keys ``backbone.*`` (ResNet, ResNeXt,
    optionally with DCN ``conv2.conv_offset``, or Res2Net), ``neck.lateral_convs.i.conv.*``,
    ``neck.fpn_convs.i.conv.*``, ``bbox_head.{cls,reg}_convs.i.{conv,gn}.*``,
    ``bbox_head.gfl_cls``, ``bbox_head.gfl_reg``, ``bbox_head.scales.i.scale`` and, for
    GFLV2, ``bbox_head.reg_conf.{0,2}``. The result is a full Detectron2 checkpoint for
    the ``GFocalV2`` meta-architecture (``backbone.bottom_up.*``, ``backbone.fpn_*``,
    ``backbone.top_block.p6/p7``, ``head.*``). The released classifier has C + 1 output
    channels (``QualityFocalLoss(use_sigmoid=False)``: an extra background channel at
    the end, trained to 0); the last channel is dropped.

``imagenet``
    ImageNet classification weights: torchvision ResNet / ResNeXt state dicts, the
    open-mmlab ``resnext101_32x4d`` release (same naming) and the Res2Net v1d release
    (MMDetection naming ``stem.{0,1,3,4,6,7}`` or the original ``conv1.{0,1,3,4,6}`` +
    ``bn1``). The result holds the backbone only, under ``backbone.bottom_up.``;
    ``MODEL.WEIGHTS`` can point to it to start training.

``timm``
    A timm checkpoint (``model.safetensors`` of a Hugging Face timm repository, or a ``.pth`` /
    ``.bin`` state dict, plain or under ``"state_dict"`` / ``"model"`` / ``"state_dict_ema"``)
    for the backbone ``build_timm_fpn_backbone`` with ``MODEL.TIMM.NAME`` ``--name`` (or that
    of ``--config-file``). timm itself reads the file and builds its feature extractor
    (``features_only=True``, the classifier dropped); the result holds it under
    ``backbone.bottom_up.model.``. A checkpoint of another model is an error (see
    :mod:`.timm_weights`).

Every source key is either converted or reported (with the reason it was dropped);
every parameter and buffer of the target model is either filled or reported; a
shape mismatch is an error naming both keys. The target model is built from
``--config-file`` if given, otherwise from the architecture found in the source
(depth, ResNeXt groups, deformable stages, number of classes, reg_max, DGQP).

Code: :mod:`.report` holds the errors and the report of what happened to every key,
:mod:`.backbone` detects the backbone of a state dict and renames its keys, :mod:`.imagenet`,
:mod:`.mmdet` and :mod:`.timm_weights` convert the three sources, :mod:`.target` builds the
target model and compares the converted tensors with it, :mod:`.files` reads a source file
and writes the checkpoint (timm: atomically), :mod:`.cli` is the command line
(``python -m gfocalv2.convert``, ``gfocalv2-convert``).
"""

import logging

# Every name of __all__, and the public names outside it (``X as X``) that the single module
# ``gfocalv2/convert.py`` had.
from .. import compat

# an entry point (python -m gfocalv2.convert, gfocalv2-convert):
# the fixes come before anything imports Detectron2
compat.apply()

from .backbone import ARCHS, detect_backbone, rename_backbone_key
from .backbone import BackboneInfo as BackboneInfo
from .cli import main
from .files import convert_file, load_source
from .imagenet import convert_imagenet
from .mmdet import convert_mmdet
from .report import ConversionError, ConversionReport
from .target import build_target_cfg, check_against_model
from .target import build_target_state as build_target_state
from .timm_weights import convert_timm

logger = logging.getLogger("gfocalv2.convert")

__all__ = [
    "ConversionError",
    "ConversionReport",
    "ARCHS",
    "load_source",
    "detect_backbone",
    "rename_backbone_key",
    "convert_mmdet",
    "convert_imagenet",
    "convert_timm",
    "check_against_model",
    "build_target_cfg",
    "convert_file",
    "main",
]
