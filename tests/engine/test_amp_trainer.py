"""SOLVER.AMP.ENABLED through the Trainer (the model itself under autocast:
tests/modeling/test_autocast.py)."""

import torch

from tests.utils.workflow import DIGITS_CONFIG, tiny_opts


def test_trainer_with_solver_amp_on_cpu(tiny_digits, tmp_path):
    """SOLVER.AMP.ENABLED on a CPU trains (bfloat16 autocast) instead of failing in AMPTrainer."""
    from detectron2.engine import AMPTrainer

    from gfocalv2.engine import Trainer, build_cfg, register_coco_datasets

    data = tiny_digits
    register_coco_datasets(
        [["amp_train", *map(str, data["train"])], ["amp_val", *map(str, data["val"])]]
    )
    opts = tiny_opts(tmp_path / "out", "amp_train", "amp_val", max_iter=2) + [
        "SOLVER.AMP.ENABLED",
        "True",
    ]
    cfg = build_cfg(DIGITS_CONFIG, [str(o) for o in opts])
    trainer = Trainer(cfg)
    # Detectron2's SimpleTrainer (its AMPTrainer needs CUDA), the forward pass under bfloat16
    # autocast
    assert not isinstance(trainer._trainer, AMPTrainer) and trainer.cfg.SOLVER.AMP.ENABLED
    head_dtypes = []
    trainer.model.head.bbox_pred.register_forward_hook(
        lambda m, i, o: head_dtypes.append((m.training, o.dtype))
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    # the training steps ran in bfloat16 (3 pyramid levels x 2 steps); the final evaluation in
    # float32
    assert [d for training, d in head_dtypes if training] == [torch.bfloat16] * 6
    assert {d for training, d in head_dtypes if not training} == {torch.float32}
    latest = trainer.storage.latest()
    for key in ("loss_qfl", "loss_giou", "loss_dfl"):
        assert torch.isfinite(torch.tensor(latest[key][0])), key
