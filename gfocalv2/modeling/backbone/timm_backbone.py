"""Any timm model with ``features_only`` support as the bottom-up network of the FPN.

``build_timm_fpn_backbone`` (registered in Detectron2's ``BACKBONE_REGISTRY``) builds
``timm.create_model(MODEL.TIMM.NAME, features_only=True)`` and puts the FPN of
:func:`~gfocalv2.modeling.backbone.fpn.build_gfocal_fpn` (P6/P7 from P5, only the levels the
head reads) on it. The timm features are named by their stride as Detectron2's ResNet names
its stages (stride 8 -> ``res3``, 16 -> ``res4``, 32 -> ``res5``), from timm's
``feature_info``; where several features share a stride, the deepest one. So the FPN keys of
the ResNet configs (``MODEL.FPN.IN_FEATURES: ["res3", "res4", "res5"]``) work unchanged.

* ``MODEL.BACKBONE.FREEZE_AT`` keeps its meaning for ResNet: 0 trains everything; 1 freezes
  the stem (every layer the stride-4 stage depends on, not that stage itself); n >= 2 freezes
  every layer that the stride-2^n features (``res<n>``) depend on. Which parameters these are
  is found by differentiating the features of a small probe image, so it holds for any
  architecture whatever its module names.
* ``MODEL.TIMM.NORM`` decides the BatchNorms' statistics, as ``MODEL.RESNETS.NORM``:
  "BNEval" (the default; running statistics only, affine trained: MMDetection's
  ``norm_eval=True``), "FrozenBN" (statistics and affine frozen), "BN" (statistics trained
  per process), "SyncBN" (synchronized over the processes, CUDA; timm's
  ``convert_sync_batchnorm``, which keeps timm's fused norm+activation layers), "naiveSyncBN"
  (Detectron2's ``NaiveSyncBatchNorm``, CPU and CUDA, activation kept; for training from
  scratch with several processes). BatchNorms in frozen layers are always in eval mode.
  LayerNorm and GroupNorm (ConvNeXt, Swin) have no statistics and train.
* Input size: images are padded to a multiple of the coarsest feature stride (the model's
  ``size_divisibility``). Models whose pretrained configuration declares a fixed input size
  (Swin) are built with ``strict_img_size=False`` and checked on a probe image of another
  size; models that still cannot take it are refused with their name.
* Channels-last (NHWC) features, which some transformers return, are permuted to NCHW.
"""

import difflib
import logging
import math
from typing import Dict, List, Optional

import torch
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from torch import nn

from .fpn import build_gfocal_fpn

__all__ = [
    "TIMM_NORMS",
    "NaiveSyncBatchNormAct",
    "convert_naive_sync_batchnorm",
    "TimmBackbone",
    "TimmBackboneError",
    "build_timm_backbone",
    "build_timm_fpn_backbone",
    "check_pixel_normalization",
    "close_model_names",
    "create_timm_features",
    "unknown_model_message",
]

logger = logging.getLogger(__name__)

#: MODEL.TIMM.NORM values (see the module doc).
TIMM_NORMS = ("BNEval", "FrozenBN", "BN", "SyncBN", "naiveSyncBN")


class NaiveSyncBatchNormAct(NaiveSyncBatchNorm):
    """Detectron2's ``NaiveSyncBatchNorm`` (statistics averaged over the processes; CPU and CUDA)
    followed by the dropout and activation of the timm ``BatchNormAct2d`` it replaces, whose
    state dict keys it keeps."""

    def __init__(self, norm: nn.BatchNorm2d):
        super().__init__(norm.num_features, norm.eps, norm.momentum, norm.affine)
        self.load_state_dict(norm.state_dict())
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def convert_naive_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``module`` (timm's fused BatchNormAct2d included) replaced by
    :class:`NaiveSyncBatchNormAct`, in place; returns ``module``."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, NaiveSyncBatchNorm):
            setattr(module, name, NaiveSyncBatchNormAct(child))
        else:
            convert_naive_sync_batchnorm(child)
    return module


class TimmBackboneError(ValueError):
    """A timm model that cannot be this backbone (unknown name, no feature extraction, no
    features at the strides the FPN needs, a fixed input size); the message says what to do."""


def _import_timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is in requirements.txt
        raise TimmBackboneError(
            "MODEL.BACKBONE.NAME build_timm_fpn_backbone needs timm: pip install 'timm>=1.0' "
            "(or this package with its [timm] extra)"
        ) from e
    return timm


def close_model_names(timm, name: str, limit: int = 5) -> List[str]:
    """timm model names close to ``name``: those that contain it, then by spelling."""
    names = timm.list_models()
    containing = [n for n in names if name.lower() in n]
    spelled = difflib.get_close_matches(name.lower(), names, n=limit, cutoff=0.6)
    return list(dict.fromkeys(spelled + containing))[:limit]


def unknown_model_message(timm, name: str, where: str) -> str:
    """What to say when ``where`` (a config key, a command-line option) names no timm model."""
    close = close_model_names(timm, name)
    hint = f" Close names: {', '.join(close)}." if close else ""
    return (
        f"{where} {name!r} is not a timm {timm.__version__} model.{hint} "
        "timm.list_models('*pattern*') lists the names."
    )


def create_timm_features(
    name: str, pretrained: bool = False, drop_path_rate: float = 0.0, **kwargs
) -> nn.Module:
    """``timm.create_model(name, features_only=True, ...)`` with errors that say what to do.

    ``drop_path_rate`` is passed only when positive (not every model takes it); ``kwargs`` go
    to ``timm.create_model`` (for example ``pretrained_cfg_overlay=dict(file=path)`` to load
    pretrained weights from a local file).
    """
    timm = _import_timm()
    if not name:
        raise TimmBackboneError(
            "MODEL.TIMM.NAME is empty: set it to a timm model name, e.g. MODEL.TIMM.NAME "
            "convnext_tiny (timm.list_models() lists them)"
        )
    if not timm.is_model(name):
        raise TimmBackboneError(unknown_model_message(timm, name, "MODEL.TIMM.NAME"))
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    fixed_size = bool(timm.models.get_pretrained_cfg_value(name, "fixed_input_size"))
    # Models declared for one input size may take any with one of these options (Swin: the
    # first, ViT: the second); the probe in TimmBackbone checks that one did.
    size_options = (
        [{"strict_img_size": False}, {"dynamic_img_size": True}, {}] if fixed_size else [{}]
    )
    try:
        for options in size_options:
            try:
                model = timm.create_model(
                    name, pretrained=pretrained, features_only=True, **options, **kwargs
                )
                break
            except TypeError as e:
                if not options or next(iter(options)) not in str(e):
                    raise
    except Exception as e:
        if pretrained and not isinstance(e, (TypeError, AssertionError, NotImplementedError)):
            raise TimmBackboneError(
                f"timm could not load the pretrained weights of {name!r} ({type(e).__name__}: "
                f"{e}). They come from the Hugging Face hub, which needs a network connection; "
                "offline, convert a local timm checkpoint with `python -m gfocalv2.convert timm "
                f"--name {name} CHECKPOINT OUTPUT.pth`, then set MODEL.WEIGHTS OUTPUT.pth and "
                "MODEL.TIMM.PRETRAINED False."
            ) from e
        raise TimmBackboneError(
            f"timm cannot build {name!r} as a feature extractor (features_only=True): "
            f"{type(e).__name__}: {e}. Pick a model with feature extraction support, e.g. "
            "resnet50, convnext_tiny, efficientnet_b0, mobilenetv3_large_100, regnety_016."
        ) from e
    model.fixed_input_size = fixed_size
    return model


def _stage_names(reductions: List[int]) -> Dict[int, str]:
    """{feature index: "res<k>"} for the deepest feature at each power-of-two stride 2^k."""
    names = {}
    for i, r in enumerate(reductions):
        if r >= 2 and r & (r - 1) == 0:
            names = {j: n for j, n in names.items() if n != f"res{int(math.log2(r))}"}
            names[i] = f"res{int(math.log2(r))}"
    return names


def _normalization_layers(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class TimmBackbone(Backbone):
    """A timm feature extractor with Detectron2's ``Backbone`` interface.

    Input: images (N, 3, H, W), H and W multiples of :attr:`size_divisibility`. Output:
    {"res<k>": (N, C_k, H / 2^k, W / 2^k)} for the requested ``out_features``.
    The timm model is ``self.model`` (its parameters ``backbone.bottom_up.model.*`` in a
    GFocalV2 model with an FPN).
    """

    def __init__(
        self,
        name: str,
        out_features: List[str],
        pretrained: bool = False,
        freeze_at: int = 0,
        norm: str = "BNEval",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if norm not in TIMM_NORMS:
            raise TimmBackboneError(
                f"MODEL.TIMM.NORM {norm!r}: the timm backbone takes one of {TIMM_NORMS}"
            )
        self.name = name
        self.model = create_timm_features(name, pretrained, drop_path_rate)
        info = self.model.feature_info
        reductions, channels = info.reduction(), info.channels()
        stages = _stage_names(reductions)
        available = {n: i for i, n in stages.items()}
        missing = [f for f in out_features if f not in available]
        if missing:
            raise TimmBackboneError(
                f"timm model {name!r} has features at strides {reductions} "
                f"({', '.join(sorted(available)) or 'none at distinct powers of two'}); "
                f"{missing} (stride {', '.join(str(2 ** int(f[3:])) for f in missing)}) "
                "is not among them. The FPN reads MODEL.FPN.IN_FEATURES: pick levels the model "
                "has, or a model with a feature pyramid (convolutional networks, Swin; plain "
                "ViTs have one stride only)."
            )
        self._out_features = list(out_features)
        self._indices = [available[f] for f in out_features]
        self._out_feature_strides = {f: reductions[available[f]] for f in out_features}
        self._out_feature_channels = {f: channels[available[f]] for f in out_features}
        self._channels_last_output = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        self._size_divisibility = max(reductions)
        self.norm = norm
        if norm == "SyncBN":  # timm's conversion keeps its fused norm + activation layers
            from timm.layers import convert_sync_batchnorm

            self.model = convert_sync_batchnorm(self.model)
        elif norm == "naiveSyncBN":
            convert_naive_sync_batchnorm(self.model)
        self._frozen_norms = set()
        self.freeze(freeze_at, stages, info)
        if norm == "FrozenBN":
            for m in _normalization_layers(self.model):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
        if self.model.fixed_input_size:
            self._check_any_size()
        self.train(self.training)  # fixed-statistics BatchNorms in eval mode from the start

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def output_shape(self):
        return {
            f: ShapeSpec(
                channels=self._out_feature_channels[f], stride=self._out_feature_strides[f]
            )
            for f in self._out_features
        }

    def forward(self, x):
        features = self.model(x)
        out = {}
        for name, index in zip(self._out_features, self._indices):
            f = features[index]
            out[name] = f.permute(0, 3, 1, 2) if self._channels_last_output else f
        return out

    def train(self, mode: bool = True):
        """As ``nn.Module.train``, but BatchNorms with fixed statistics ("BNEval", "FrozenBN",
        frozen layers) stay in eval mode."""
        super().train(mode)
        if mode:
            for i, m in enumerate(_normalization_layers(self.model)):
                if self.norm in ("BNEval", "FrozenBN") or i in self._frozen_norms:
                    m.eval()
        return self

    # ----------------------------------------------------------------------------- freezing
    def _probe(self, size: Optional[int] = None):
        """Features of a probe image (1, 3, size, size), the model in eval mode (no statistics
        updated), with gradients."""
        size = size or 2 * self._size_divisibility
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                return self.model(torch.zeros(1, 3, size, size))
        finally:
            self.model.train(was_training)

    def _dependencies(self, feature) -> set:
        """Names of the parameters that ``feature`` (a probe output) depends on."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(
            feature.sum(), [p for _, p in named], allow_unused=True, retain_graph=True
        )
        return {n for (n, _), g in zip(named, grads) if g is not None}

    def freeze(self, freeze_at: int, stages: Dict[int, str], info):
        """Freeze the layers ``MODEL.BACKBONE.FREEZE_AT`` names (module doc); their BatchNorms
        stay in eval mode."""
        if freeze_at <= 0:
            return
        level = max(freeze_at, 2)
        index = {n: i for i, n in stages.items()}.get(f"res{level}")
        if index is None:
            raise TimmBackboneError(
                f"MODEL.BACKBONE.FREEZE_AT {freeze_at}: timm model {self.name!r} has no features "
                f"at stride {2**level} (its strides: {info.reduction()}); use a smaller value "
                "or 0"
            )
        features = self._probe()
        frozen = self._dependencies(features[index])
        if freeze_at == 1:  # the stem: what the stride-4 stage depends on, not the stage itself
            module = info.module_name(index)
            prefixes = (module + ".", module.replace(".", "_") + ".")
            frozen = {n for n in frozen if not n.startswith(prefixes)}
        for n, p in self.model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        for i, m in enumerate(_normalization_layers(self.model)):
            own = list(m.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                self._frozen_norms.add(i)

    def _check_any_size(self):
        size = 3 * self._size_divisibility  # not the model's declared size
        try:
            with torch.no_grad():
                self._probe(size)
        except Exception as e:
            raise TimmBackboneError(
                f"timm model {self.name!r} takes a fixed input size only (it failed on a "
                f"{size}x{size} image: {type(e).__name__}: {e}); detection needs any size. "
                "Pick a convolutional model or one that accepts any size."
            ) from e


def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """The :class:`TimmBackbone` of ``MODEL.TIMM``, with the features ``MODEL.FPN.IN_FEATURES``
    names. timm's pretrained weights are downloaded (``MODEL.TIMM.PRETRAINED``) only when
    ``MODEL.WEIGHTS`` is empty: weights given there replace them."""
    if input_shape.channels != 3:
        raise TimmBackboneError(
            f"the timm backbone takes 3-channel images, not {input_shape.channels} "
            "(len(MODEL.PIXEL_MEAN))"
        )
    t = cfg.MODEL.TIMM
    # MODEL.WEIGHTS replaces the backbone's weights when the model is loaded: no download then.
    pretrained = t.PRETRAINED and not cfg.MODEL.WEIGHTS
    backbone = TimmBackbone(
        t.NAME,
        out_features=list(cfg.MODEL.FPN.IN_FEATURES),
        pretrained=pretrained,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        norm=t.NORM,
        drop_path_rate=t.DROP_PATH_RATE,
    )
    if pretrained:
        check_pixel_normalization(cfg, backbone.model.pretrained_cfg)
    return backbone


def check_pixel_normalization(cfg, pretrained_cfg):
    """Warn when MODEL.PIXEL_MEAN/STD (0-255 RGB) are not the ones the weights were trained
    with (timm's ``pretrained_cfg`` mean/std, 0-1 scale)."""
    mean = [round(255 * m, 3) for m in pretrained_cfg.get("mean", ())]
    std = [round(255 * s, 3) for s in pretrained_cfg.get("std", ())]
    if not mean or not std:
        return
    close = all(abs(a - b) < 0.01 for a, b in zip(cfg.MODEL.PIXEL_MEAN, mean)) and all(
        abs(a - b) < 0.01 for a, b in zip(cfg.MODEL.PIXEL_STD, std)
    )
    if not close or cfg.INPUT.FORMAT != "RGB":
        logger.warning(
            "The pretrained %s weights were trained on RGB images normalized with mean %s and "
            "std %s (0-255 scale); this config has INPUT.FORMAT %s, MODEL.PIXEL_MEAN %s, "
            "MODEL.PIXEL_STD %s. Set those to use the weights as trained.",
            cfg.MODEL.TIMM.NAME,
            mean,
            std,
            cfg.INPUT.FORMAT,
            list(cfg.MODEL.PIXEL_MEAN),
            list(cfg.MODEL.PIXEL_STD),
        )


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec):
    """timm feature extractor (``MODEL.TIMM``) + FPN + P6/P7 from P5 (the levels the head
    reads; see :func:`~gfocalv2.modeling.backbone.fpn.build_gfocal_fpn`)."""
    return build_gfocal_fpn(cfg, build_timm_backbone(cfg, input_shape))
