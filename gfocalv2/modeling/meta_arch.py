"""The GFocalV2 meta-architecture (GFLV1 when the DGQP is switched off).

images -> backbone/FPN -> GFocalHead -> training: ATSS targets + QFL/GIoU/DFL
                                    -> inference: joint scores, then detections.py (per-level
                                       top-k, decode, clip, class-wise NMS)
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils import comm
from torch import Tensor, nn

from .atss import atss_assign
from .backbone.fpn import unread_level_parameters
from .box_coder import distance_targets, distance_to_box, distribution_to_distance
from .detections import anchor_centers, image_candidates, select_detections
from .head import GFocalHead
from .losses import distribution_focal_loss, giou_loss, quality_focal_loss

__all__ = ["GFocalV2"]

logger = logging.getLogger(__name__)


def _reduce_mean(x: Tensor) -> Tensor:
    """Mean of a tensor over all processes (identity with one process)."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size


@META_ARCH_REGISTRY.register()
class GFocalV2(DenseDetector):
    """Generalized Focal Loss V2 (Li et al., CVPR 2021); GFLV1 with ``dgqp_enabled=False``
    in the head (``MODEL.GFOCAL.DGQP_ENABLED: False``)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: GFocalHead,
        head_in_features: List[str],
        anchor_generator: nn.Module,
        num_classes: int,
        atss_topk: int = 9,
        qfl_beta: float = 2.0,
        qfl_weight: float = 1.0,
        dfl_weight: float = 0.25,
        giou_weight: float = 2.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
    ):
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        cell_anchors = anchor_generator.num_cell_anchors
        if any(n != 1 for n in cell_anchors):
            raise ValueError(
                "GFocalV2 uses one anchor per location (its centre is the regression point), but "
                f"MODEL.ANCHOR_GENERATOR gives {cell_anchors} per level: set one size per level "
                "and ASPECT_RATIOS: [[1.0]]."
            )
        shapes = backbone.output_shape()
        feature_strides = [shapes[f].stride for f in head_in_features]
        if list(anchor_generator.strides) != feature_strides:
            raise ValueError(
                f"Anchor strides {anchor_generator.strides} differ from the strides "
                f"{feature_strides} of {head_in_features}"
            )
        if num_classes != head.num_classes:
            raise ValueError(
                f"num_classes {num_classes} differs from the head's {head.num_classes}"
            )
        if atss_topk < 1:
            raise ValueError(f"MODEL.GFOCAL.ATSS_TOPK must be >= 1, got {atss_topk}")
        levels, unused = unread_level_parameters(self, "backbone", backbone, head_in_features)
        if unused:
            raise ValueError(
                f"MODEL.GFOCAL.IN_FEATURES {list(head_in_features)} does not read the backbone "
                f"levels {levels}, and these trainable parameters serve only them, so they would "
                "never get a gradient (DistributedDataParallel stops at the 2nd iteration on such "
                f"parameters): {unused}. Read these levels, or use a backbone that builds only the "
                "levels the head reads (gfocalv2's build_gfocal_resnet_fpn_backbone / "
                "build_gfocal_res2net_fpn_backbone do), or set requires_grad=False on these "
                "parameters."
            )
        self.anchor_generator = anchor_generator
        self.num_classes = num_classes
        self.reg_max = head.reg_max
        self.atss_topk = atss_topk
        self.qfl_beta = qfl_beta
        self.qfl_weight = qfl_weight
        self.dfl_weight = dfl_weight
        self.giou_weight = giou_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    @classmethod
    def from_config(cls, cfg):
        g = cfg.MODEL.GFOCAL
        if g.NUM_CLASSES < 1:
            raise ValueError(f"MODEL.GFOCAL.NUM_CLASSES must be >= 1, got {g.NUM_CLASSES}")
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in g.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.GFOCAL.IN_FEATURES {list(g.IN_FEATURES)}: {missing} not produced by the "
                f"backbone {cfg.MODEL.BACKBONE.NAME}, which outputs {sorted(shapes)}"
            )
        feature_shapes = [shapes[f] for f in g.IN_FEATURES]
        return {
            "backbone": backbone,
            "head": GFocalHead(cfg, feature_shapes),
            "head_in_features": list(g.IN_FEATURES),
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "num_classes": g.NUM_CLASSES,
            "atss_topk": g.ATSS_TOPK,
            "qfl_beta": g.QFL_BETA,
            "qfl_weight": g.QFL_WEIGHT,
            "dfl_weight": g.DFL_WEIGHT,
            "giou_weight": g.GIOU_WEIGHT,
            "test_score_thresh": g.SCORE_THRESH_TEST,
            "test_topk_candidates": g.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": g.NMS_THRESH_TEST,
            "max_detections_per_image": g.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def dgqp_enabled(self) -> bool:
        return self.head.dgqp is not None

    # ------------------------------------------------------------------ shared
    def _anchors(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level: (A_l, 4) anchor boxes and (A_l,) strides."""
        anchors = [a.tensor for a in self.anchor_generator(features)]
        strides = [
            torch.full((len(a),), float(s), device=a.device)
            for a, s in zip(anchors, self.anchor_generator.strides)
        ]
        return anchors, strides

    def _valid_locations(
        self, features: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> Optional[List[Tensor]]:
        """Per level, (N, H_l * W_l) bool: whether each location lies inside its own image's
        padded size; None when every location of every image does.

        As the reference: an image is padded to a multiple of the backbone's size
        divisibility (32), and a location is valid when its feature-map row is below
        ceil(pad_h / stride) and its column below ceil(pad_w / stride) (MMDetection's anchor
        ``valid_flags`` with the image's ``pad_shape``). The rest of the batch-padded tensor
        exists only because another image of the batch is larger: an image must not train
        or detect there, or its results would depend on its batch.

        Built from the host-side image sizes, compared on the device as Python scalars: no
        host-to-device copy, which would wait for the GPU work queued before it. Equal padded
        sizes (single images, exported graphs) give None, so those cases carry no mask at all.
        """
        div = max(1, self.backbone.size_divisibility)
        shapes = [tuple(f.shape[-2:]) for f in features]
        strides = self.anchor_generator.strides
        rows, cols = [], []  # (N, L): valid rows and columns of each image on each level
        for h, w in image_sizes:
            pad_h, pad_w = -(-h // div) * div, -(-w // div) * div  # ceil to a multiple of div
            rows.append([min(-(-pad_h // s), H) for s, (H, _) in zip(strides, shapes)])
            cols.append([min(-(-pad_w // s), W) for s, (_, W) in zip(strides, shapes)])
        if all(r == [H for H, _ in shapes] for r in rows) and all(
            c == [W for _, W in shapes] for c in cols
        ):
            return None
        device = features[0].device
        valid = []
        for level, (H, W) in enumerate(shapes):
            ys, xs = torch.arange(H, device=device), torch.arange(W, device=device)
            in_rows = torch.stack([ys < r[level] for r in rows])  # (N, H)
            in_cols = torch.stack([xs < c[level] for c in cols])  # (N, W)
            # Locations are ordered row-major (y, then x), as the anchors and permute_to_N_HWA_K.
            valid.append((in_rows[:, :, None] & in_cols[:, None, :]).flatten(1))
        return valid

    def _flatten(self, predictions) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Per-level (N, K, H, W) maps -> (N, A, K) with levels concatenated, finest first."""
        cls_logits, box_logits, quality_logits = predictions
        cls = cat([permute_to_N_HWA_K(x, self.num_classes) for x in cls_logits], dim=1)
        box = cat([permute_to_N_HWA_K(x, 4 * (self.reg_max + 1)) for x in box_logits], dim=1)
        quality = (
            cat([permute_to_N_HWA_K(x, 1) for x in quality_logits], dim=1)
            if self.dgqp_enabled
            else None
        )
        return cls, box, quality

    def joint_scores(self, cls_logits: Tensor, quality_logits: Optional[Tensor]) -> Tensor:
        """(..., C) class logits and (..., 1) DGQP logits -> (..., C) joint class-quality
        scores in [0, 1]."""
        scores = cls_logits.float().sigmoid()
        if quality_logits is not None:
            scores = scores * quality_logits.float().sigmoid()
        return scores

    # ---------------------------------------------------------------- training
    def forward_training(
        self, images: ImageList, features: List[Tensor], predictions, gt_instances: List[Instances]
    ):
        anchors, strides, gt_boxes, gt_classes, matched_idx, is_pos, valid = self.label_anchors(
            features, gt_instances, images.image_sizes
        )
        return self.losses(
            anchors,
            strides,
            self._flatten(predictions),
            gt_boxes,
            gt_classes,
            matched_idx,
            is_pos,
            valid,
        )

    @torch.no_grad()
    def label_anchors(
        self,
        features: List[Tensor],
        gt_instances: List[Instances],
        image_sizes: Optional[List[Tuple[int, int]]] = None,
    ):
        """Training targets: the anchors and their ATSS assignment.

        Args:
            image_sizes: (height, width) of each (unpadded) image; anchors outside an image's
                own padded size are then invalid (see :meth:`_valid_locations`). None: every
                anchor is valid for every image.

        Returns:
            anchors: (A, 4) of all levels, finest first; strides: (A,);
            gt_boxes: (N, G, 4); gt_classes: (N, G) (padding: num_classes);
            matched_idx, is_pos: (N, A), see :func:`atss_assign`;
            valid: (N, A) bool, or None when all anchors are valid.
        """
        anchors, strides = self._anchors(features)
        num_per_level = [len(a) for a in anchors]
        anchors, strides = cat(anchors), cat(strides)
        valid = None if image_sizes is None else self._valid_locations(features, image_sizes)
        valid = None if valid is None else cat(valid, dim=1)
        gt_boxes, gt_classes, gt_valid = self._pad_ground_truth(gt_instances)
        matched_idx, is_pos = atss_assign(
            anchors, num_per_level, gt_boxes, gt_valid, self.atss_topk, anchor_valid=valid
        )
        return anchors, strides, gt_boxes, gt_classes, matched_idx, is_pos, valid

    def _pad_ground_truth(self, gt_instances: List[Instances]) -> Tuple[Tensor, Tensor, Tensor]:
        """Ground truth as (N, G, 4) boxes, (N, G) classes and (N, G) validity,
        G = max boxes per image."""
        G = max([1] + [len(x) for x in gt_instances])  # at least one (padding) column
        N = len(gt_instances)
        boxes = torch.zeros((N, G, 4), device=self.device)
        classes = torch.full((N, G), self.num_classes, dtype=torch.long, device=self.device)
        valid = torch.zeros((N, G), dtype=torch.bool, device=self.device)
        for i, inst in enumerate(gt_instances):
            n = len(inst)
            boxes[i, :n] = inst.gt_boxes.tensor
            classes[i, :n] = inst.gt_classes
            valid[i, :n] = True
        return boxes, classes, valid

    def losses(
        self,
        anchors,
        strides,
        flat_predictions,
        gt_boxes,
        gt_classes,
        matched_idx,
        is_pos,
        valid=None,
    ) -> Dict[str, Tensor]:
        """QFL, GIoU and DFL, normalized as the reference does.

        Args:
            anchors: (A, 4) XYXY; strides: (A,).
            flat_predictions: (N, A, C) class logits, (N, A, 4 * (reg_max + 1)) box logits,
                (N, A, 1) quality logits or None.
            gt_boxes: (N, G, 4); gt_classes: (N, G); matched_idx, is_pos: (N, A) from ATSS.
            valid: (N, A) bool or None (all valid): invalid anchors (outside their image's
                own padded size) get QFL weight 0; ATSS never makes them positive.

        QFL is divided by the sum over images of max(positives, 1) (an image without
        positives counts 1), GIoU and DFL by the sum of the positives' weights, both
        averaged over processes.

        Computed densely over all anchors (negatives get their own anchor box as a benign
        regression target and zero weight), so there is no data-dependent indexing and no
        host-device synchronization.
        """
        cls_logits, box_logits, quality_logits = flat_predictions
        N, A, C = cls_logits.shape
        with torch.autocast(device_type=cls_logits.device.type, enabled=False):
            centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (A, 2)
            box_logits = box_logits.float()
            pred_dist = distribution_to_distance(box_logits, self.reg_max)  # (N, A, 4) stride units
            pred_boxes = distance_to_box(centers, pred_dist * strides[:, None])  # (N, A, 4) pixels

            matched_boxes = gt_boxes.gather(1, matched_idx[..., None].expand(N, A, 4))
            target_boxes = torch.where(is_pos[..., None], matched_boxes, anchors.expand(N, A, 4))
            labels = torch.where(
                is_pos, gt_classes.gather(1, matched_idx), torch.full_like(matched_idx, C)
            )

            iou = matched_pairwise_iou(
                Boxes(pred_boxes.detach().reshape(-1, 4)), Boxes(target_boxes.reshape(-1, 4))
            )
            iou_target = torch.where(
                is_pos.reshape(-1), iou.clamp(min=0.0).nan_to_num(0.0), torch.zeros_like(iou)
            )

            scores = self.joint_scores(cls_logits, quality_logits)  # (N, A, C)
            if self.dgqp_enabled:
                qfl = quality_focal_loss(
                    scores.reshape(-1, C), labels.reshape(-1), iou_target, self.qfl_beta
                )
            else:
                qfl = quality_focal_loss(
                    cls_logits.float().reshape(-1, C),
                    labels.reshape(-1),
                    iou_target,
                    self.qfl_beta,
                    use_sigmoid=True,
                )
            qfl = qfl.reshape(N, A)
            if valid is not None:  # where, not a product: no 0 x inf from garbage in the padding
                qfl = torch.where(valid, qfl, torch.zeros_like(qfl))
            # The reference's normalizer: each image adds max(its positives, 1), so an image
            # without positives still counts (its negatives' loss is not scaled up).
            num_pos = _reduce_mean(is_pos.sum(dim=1).clamp(min=1).sum().float())

            # Each positive is weighted by its (detached) best joint score.
            weight = torch.where(
                is_pos, scores.detach().amax(dim=-1), torch.zeros_like(scores[..., 0])
            )
            weight_sum = _reduce_mean(weight.sum()).clamp(min=1e-6)
            giou = giou_loss(pred_boxes.reshape(-1, 4), target_boxes.reshape(-1, 4)).reshape(N, A)
            target_dist = distance_targets(
                centers, target_boxes, strides, self.reg_max
            )  # (N, A, 4), <= reg_max - 0.1
            dfl = distribution_focal_loss(
                box_logits.reshape(-1, self.reg_max + 1), target_dist.reshape(-1)
            )
            dfl = dfl.reshape(N, A, 4).mean(dim=-1)

            return {
                "loss_qfl": self.qfl_weight * qfl.sum() / num_pos,
                "loss_giou": self.giou_weight * (giou * weight).sum() / weight_sum,
                "loss_dfl": self.dfl_weight * (dfl * weight).sum() / weight_sum,
            }

    # --------------------------------------------------------------- inference
    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions
    ) -> List[Instances]:
        """Per image, the detections in the (resized, unpadded) input image's pixels."""
        results = []
        for image_size, (boxes, scores) in zip(
            images.image_sizes, self.candidates(images, features, predictions)
        ):
            results.append(self.detections(boxes, scores, image_size))
        return results

    def candidates(
        self, images: ImageList, features: List[Tensor], predictions
    ) -> List[Tuple[Tensor, Tensor]]:
        """Per image, its candidates (:func:`~gfocalv2.modeling.detections.image_candidates`):
        (K, 4) boxes in the input image's pixels and (K, C) scores, before the score threshold
        and NMS (test-time augmentation merges those of several views)."""
        centers = anchor_centers(
            [f.shape[-2:] for f in features],
            self.anchor_generator.strides,
            self.anchor_generator.offset,
            features[0].device,
        )
        cls_logits, box_logits, quality_logits = predictions
        C, bins = self.num_classes, 4 * (self.reg_max + 1)
        qualities = quality_logits if self.dgqp_enabled else [None] * len(cls_logits)
        scores = [
            self.joint_scores(
                permute_to_N_HWA_K(c, C), None if q is None else permute_to_N_HWA_K(q, 1)
            )
            for c, q in zip(cls_logits, qualities)
        ]  # per level (N, A_l, C)
        boxes = [permute_to_N_HWA_K(b, bins) for b in box_logits]
        valid = self._valid_locations(features, images.image_sizes)  # per level (N, A_l), or None
        return [
            image_candidates(
                centers,
                self.anchor_generator.strides,
                [s[i] for s in scores],
                [b[i] for b in boxes],
                image_size,
                self.test_topk_candidates,
                self.reg_max,
                None if valid is None else [v[i] for v in valid],
            )
            for i, image_size in enumerate(images.image_sizes)
        ]

    def detections(self, boxes: Tensor, scores: Tensor, image_size: Tuple[int, int]) -> Instances:
        """(K, 4) candidate boxes and (K, C) scores of one image -> its detections
        (:func:`~gfocalv2.modeling.detections.select_detections` with the model's
        ``test_score_thresh``, ``test_nms_thresh``, ``max_detections_per_image``)."""
        boxes, scores, classes = select_detections(
            boxes,
            scores,
            self.test_score_thresh,
            self.test_nms_thresh,
            self.max_detections_per_image,
        )
        result = Instances(image_size)
        result.pred_boxes = Boxes(boxes)
        result.scores = scores
        result.pred_classes = classes
        return result

    def inference_single_image(
        self,
        centers: List[Tensor],
        strides: List[Tensor],
        scores: List[Tensor],
        box_logits: List[Tensor],
        image_size: Tuple[int, int],
        valid: Optional[List[Tensor]] = None,
    ) -> Instances:
        """Detections of one image from its per-level outputs.

        Args:
            centers: per level (A_l, 2) anchor centres; strides: per level, the stride (a
                number, or an (A_l,) tensor of it).
            scores: per level (A_l, C) joint scores; box_logits: per level (A_l, 4 * (reg_max + 1)).
            image_size: (height, width) of the (resized, unpadded) input image.
            valid: per level (A_l,) bool, False for locations outside the image's own padded
                size (the padding for a larger image of the batch); None: all valid.

        Per level, the ``test_topk_candidates`` valid locations with the highest max class score
        are decoded; boxes are clipped to the image and those of zero width or height dropped;
        then all (location, class) pairs above ``test_score_thresh`` across levels go through
        class-wise NMS, best ``max_detections_per_image`` kept.
        """
        strides = [s if isinstance(s, (int, float)) else float(s.reshape(-1)[0]) for s in strides]
        boxes, scores = image_candidates(
            centers,
            strides,
            scores,
            box_logits,
            image_size,
            self.test_topk_candidates,
            self.reg_max,
            valid,
        )
        return self.detections(boxes, scores, image_size)
