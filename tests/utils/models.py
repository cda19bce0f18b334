"""Helpers shared by the model tests: tiny configs, synthetic inputs, a tiny model that
answers like a trained one."""

import os

import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import gfocalv2.modeling  # noqa: F401  (registers GFocalV2, for build_model in any process)
from gfocalv2 import add_gfocalv2_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_CONFIG = os.path.join(REPO, "configs", "Base-GFocalV2.yaml")


def tiny_config_file(tmp_path, extra=""):
    """A YAML file with the tiny model of ``gfocal_cfg(tiny=True)``, for the command-line tools;
    ``extra`` is appended YAML."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""_BASE_: "{REPO}/configs/Base-GFocalV2.yaml"
MODEL:
  DEVICE: cpu
  RESNETS: {{DEPTH: 18, RES2_OUT_CHANNELS: 64, NORM: GN}}
  BACKBONE: {{FREEZE_AT: 0}}
  FPN: {{OUT_CHANNELS: 64}}
  GFOCAL: {{NUM_CONVS: 1, NUM_CLASSES: 3, REG_MAX: 8}}
  ANCHOR_GENERATOR: {{SIZES: [[32], [64], [128], [256], [512]]}}
{extra}"""
    )
    return str(path)


def gfocal_cfg(*opts, tiny=False):
    """The base config (R-50 GFLV2, COCO), optionally shrunk for fast CPU tests."""
    cfg = get_cfg()
    add_gfocalv2_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    if tiny:
        cfg.merge_from_list(
            [
                "MODEL.RESNETS.DEPTH",
                18,
                "MODEL.RESNETS.RES2_OUT_CHANNELS",
                64,
                "MODEL.RESNETS.NORM",
                "GN",
                "MODEL.BACKBONE.FREEZE_AT",
                0,
                "MODEL.FPN.OUT_CHANNELS",
                64,
                "MODEL.GFOCAL.NUM_CONVS",
                1,
                "MODEL.GFOCAL.NUM_CLASSES",
                3,
                "MODEL.GFOCAL.REG_MAX",
                8,
                "MODEL.ANCHOR_GENERATOR.SIZES",
                [[32], [64], [128], [256], [512]],
            ]
        )
    cfg.merge_from_list(list(opts))
    return cfg


def instances(image_hw, boxes, classes):
    inst = Instances(image_hw)
    inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    return inst


def random_input(g, h, w, num_boxes, num_classes):
    xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 8
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1)
    classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
    return {
        "image": torch.rand(3, h, w, generator=g) * 255,
        "instances": instances((h, w), boxes, classes),
    }


def varied_model():
    """A tiny GFLV2 with location- and class-dependent scores and boxes (as a trained model)."""
    torch.manual_seed(0)
    model = build_model(gfocal_cfg("MODEL.PIXEL_STD", [50.0, 50.0, 50.0], tiny=True)).eval()
    torch.manual_seed(1)  # these draws do not depend on how much of the RNG the build used
    with torch.no_grad():
        model.head.cls_score.weight.normal_(0.0, 0.05)
        model.head.cls_score.bias.fill_(-1.5)
        model.head.bbox_pred.weight.normal_(0.0, 0.05)
    return model
