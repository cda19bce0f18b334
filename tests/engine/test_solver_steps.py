"""SOLVER.STEPS against a shortened SOLVER.MAX_ITER: steps at or after the end are dropped with
a warning (instead of fvcore's "Milestone must be smaller than total number of updates"), and
steps that are not positive or not increasing are refused with an error naming SOLVER.STEPS."""

import logging

import pytest

from tests.utils.reliability import DIGITS_CONFIG, capture_logs, make_trainer, messages, tiny_cfg

from gfocalv2.engine import build_cfg
from gfocalv2.config_checks import ConfigValueError, check_solver_steps


def test_steps_at_or_after_max_iter_are_dropped_and_training_runs(coco_dataset, tmp_path):
    name = coco_dataset("solver_steps_train", sizes=[(64, 64)] * 4).name
    with capture_logs() as logs:
        cfg = tiny_cfg(tmp_path / "o", name, name, max_iter=8, extra=["SOLVER.STEPS", "(8,)"])
    warnings = [
        r.getMessage()
        for r in logs.records
        if r.levelno >= logging.WARNING and "SOLVER.STEPS" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "SOLVER.STEPS (8,): (8,) at or after SOLVER.MAX_ITER 8 never take effect" in warnings[0]
    assert cfg.is_frozen() and tuple(cfg.SOLVER.STEPS) == ()
    trainer = make_trainer(cfg)
    trainer.train()
    assert trainer.iter == 8 and [
        it for _, it in trainer.storage.history("total_loss").values()
    ] == list(range(8))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        cfg.SOLVER.BASE_LR
    )  # warmed up, never dropped


def test_only_the_late_steps_are_dropped():
    with capture_logs() as logs:
        cfg = build_cfg(
            str(DIGITS_CONFIG), ["SOLVER.MAX_ITER", "500", "SOLVER.STEPS", "(450, 500, 550)"]
        )
    assert tuple(cfg.SOLVER.STEPS) == (450,)
    assert "(500, 550) at or after SOLVER.MAX_ITER 500" in messages(logs)
    with capture_logs() as logs:  # nothing to drop: no warning
        cfg = build_cfg(str(DIGITS_CONFIG))
    assert tuple(cfg.SOLVER.STEPS) == (450, 550) and "SOLVER.STEPS" not in messages(logs)


@pytest.mark.parametrize(
    "steps, what",
    [
        ("(5, 3)", "strictly increasing"),
        ("(3, 3)", "strictly increasing"),
        ("(0, 3)", "positive"),
        ("(-2,)", "positive"),
    ],
)
def test_bad_steps_are_refused(steps, what):
    with pytest.raises(ConfigValueError, match=rf"SOLVER.STEPS .*{what}"):
        build_cfg(str(DIGITS_CONFIG), ["SOLVER.MAX_ITER", "8", "SOLVER.STEPS", steps])


def test_other_schedulers_are_left_alone():
    cfg = build_cfg(str(DIGITS_CONFIG), freeze=False)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER = (5, 3), 4
    check_solver_steps(cfg)
    assert tuple(cfg.SOLVER.STEPS) == (5, 3)
