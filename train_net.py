#!/usr/bin/env python
"""Train or evaluate GFocalV2 / GFL with Detectron2.

    # train (COCO files under $DETECTRON2_DATASETS, default ./datasets/coco)
    python train_net.py --config-file configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml --num-gpus 8
    # on a CPU-only machine (chosen automatically when CUDA is unavailable)
    python train_net.py --config-file ... MODEL.DEVICE cpu SOLVER.IMS_PER_BATCH 2
    # without CUDA, --num-gpus N starts N CPU processes (gloo): for checking a multi-process set-up
    python train_net.py --config-file ... --num-gpus 2 MODEL.DEVICE cpu SOLVER.IMS_PER_BATCH 4
    # resume from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file ... --resume
    # evaluate a checkpoint (add TEST.AUG.ENABLED True for test-time augmentation too)
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    # your own COCO-format data, no code
    python train_net.py --config-file ... --register-coco my_train train.json images/ \\
        --register-coco my_val val.json images/ \\
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)" MODEL.GFOCAL.NUM_CLASSES 3

Trailing ``KEY VALUE`` pairs override the config; they must come after all ``--flags``.
"""

from gfocalv2 import compat

compat.apply()  # first: what this Detectron2 install needs (gfocalv2/compat.py)

import gfocalv2.modeling  # noqa: F401  (registers GFocalV2 and its backbones)

from detectron2.evaluation import verify_results
from detectron2.utils import comm

from gfocalv2.engine import Trainer, setup_cfg, workflow_argument_parser
from gfocalv2.checkpoint import checkpointer_for
from gfocalv2.engine.launch import launch_from_args


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # checked load: a missing file, another architecture or class count is a clear error
        checkpointer_for(cfg, model, cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:  # test-time augmentation (TEST.AUG), as Detectron2's train_net
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main():
    args = workflow_argument_parser(epilog=__doc__).parse_args()
    print("Command Line Args:", args)
    launch_from_args(main, args)  # Detectron2's launch: NCCL with CUDA, gloo without


if __name__ == "__main__":
    invoke_main()
