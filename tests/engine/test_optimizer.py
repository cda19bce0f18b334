"""SOLVER.OPTIMIZER: "SGD" is Detectron2's optimizer unchanged; "AdamW" is torch.optim.AdamW over
Detectron2's parameter groups (same lr and weight decay per parameter), with SOLVER.BETAS,
gradient clipping and a bit-identical resume; an unknown name fails when the config is built."""

import math
import re

import pytest
import torch
from torch import nn

from tests.engine.test_trainer_faults import Killed, KillAfter
from tests.utils.reliability import DIGITS_CONFIG, VARIED_SIZES, make_trainer, training_cfg

from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model

from gfocalv2.config_checks import ConfigValueError
from gfocalv2.engine import Trainer, build_cfg

#: Non-default groups: norms and biases not decayed, biases at twice the learning rate.
GROUP_OPTS = [
    "SOLVER.WEIGHT_DECAY",
    "0.05",
    "SOLVER.WEIGHT_DECAY_NORM",
    "0.0",
    "SOLVER.WEIGHT_DECAY_BIAS",
    "0.0",
    "SOLVER.BIAS_LR_FACTOR",
    "2.0",
]


def _digits_model(opts=()):
    cfg = build_cfg(str(DIGITS_CONFIG), ["MODEL.DEVICE", "cpu", *opts])
    return cfg, build_model(cfg)


def _hyperparameters(optimizer, model):
    """{parameter name: (lr, weight_decay)}, every trained parameter exactly once."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = (group["lr"], group["weight_decay"])
    assert set(out) == {n for n, p in model.named_parameters() if p.requires_grad}
    return out


@pytest.mark.parametrize("opts", [[], GROUP_OPTS], ids=["base", "no-decay-norm-bias"])
def test_sgd_is_detectron2s_optimizer(opts):
    cfg, model = _digits_model(opts)
    ours = Trainer.build_optimizer(cfg, model)
    theirs = DefaultTrainer.build_optimizer(cfg, model)
    assert type(ours) is type(theirs) is torch.optim.SGD
    assert ours.defaults == theirs.defaults
    assert _hyperparameters(ours, model) == _hyperparameters(theirs, model)


@pytest.mark.parametrize(
    "opts, num_groups", [([], 1), (GROUP_OPTS, 3)], ids=["base", "no-decay-norm-bias"]
)
def test_adamw_has_detectron2s_parameter_groups(opts, num_groups):
    cfg, model = _digits_model(opts)
    sgd = Trainer.build_optimizer(cfg, model)
    cfg.defrost()
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BETAS = "AdamW", (0.8, 0.95)
    adamw = Trainer.build_optimizer(cfg, model)
    assert type(adamw) is torch.optim.AdamW
    groups = _hyperparameters(adamw, model)
    assert groups == _hyperparameters(sgd, model)
    assert len(set(groups.values())) == num_groups  # base: norms decayed as weights (1e-4)
    assert all(g["betas"] == (0.8, 0.95) for g in adamw.param_groups)
    assert adamw.defaults["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY
    assert adamw.defaults["lr"] == cfg.SOLVER.BASE_LR


def _tiny_module():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))


def test_adamw_steps_match_the_update_by_hand():
    """Two steps of the built optimizer against AdamW computed here (float64): decoupled weight
    decay p <- p (1 - lr wd), then p <- p - lr m_hat / (sqrt(v_hat) + eps), with the moments
    m, v of SOLVER.BETAS and their bias corrections; lr and wd of each parameter's group."""
    opts = ["SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "0.01", "SOLVER.BETAS", "(0.8, 0.95)"]
    cfg = build_cfg("", opts + GROUP_OPTS)
    model = _tiny_module()
    optimizer = Trainer.build_optimizer(cfg, model)
    b1, b2, eps, base_lr = 0.8, 0.95, 1e-8, 0.01
    named = list(model.named_parameters())
    initial = {n: p.detach().clone() for n, p in named}
    expected = {}
    for name, p in named:  # (lr, wd) from the config, independently of the optimizer
        is_bias, is_norm = name.endswith("bias"), name.startswith("1.")
        lr = base_lr * (2.0 if is_bias else 1.0)
        wd = 0.0 if (is_bias or is_norm) else 0.05
        expected[name] = dict(p=p.detach().double().clone(), m=0.0, v=0.0, lr=lr, wd=wd)
    g = torch.Generator().manual_seed(1)
    for t in (1, 2):
        for name, p in named:
            p.grad = torch.randn(p.shape, generator=g)
            e = expected[name]
            grad = p.grad.double()
            e["p"] = e["p"] * (1 - e["lr"] * e["wd"])
            e["m"] = b1 * e["m"] + (1 - b1) * grad
            e["v"] = b2 * e["v"] + (1 - b2) * grad * grad
            m_hat, v_hat = e["m"] / (1 - b1**t), e["v"] / (1 - b2**t)
            e["p"] = e["p"] - e["lr"] * m_hat / (v_hat.sqrt() + eps)
        optimizer.step()
        for name, p in named:
            assert torch.allclose(p.detach().double(), expected[name]["p"], rtol=0, atol=1e-6), (
                name,
                t,
            )
    # not a trivial match: Adam moves each parameter by about lr per step
    assert all((p.detach() - initial[n]).abs().max() > base_lr for n, p in named)
    assert all(float(optimizer.state[p]["step"]) == 2 for _, p in named)


def test_adamw_gets_detectron2s_gradient_clipping():
    cfg = build_cfg(
        "",
        [
            "SOLVER.OPTIMIZER",
            "AdamW",
            "SOLVER.CLIP_GRADIENTS.ENABLED",
            "True",
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            "value",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
            "0.001",
        ],
    )
    model = _tiny_module()
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW) and type(optimizer) is not torch.optim.AdamW
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(p.grad.abs().max() <= 0.001 for p in model.parameters())  # clipped, then stepped


@pytest.mark.parametrize("value", ["Adam", "adamw", "sgd", ""])
def test_unknown_optimizer_fails_when_the_config_is_built(value, tmp_path):
    pattern = rf"SOLVER\.OPTIMIZER '{value}' is not one of 'SGD', 'AdamW'"
    with pytest.raises(ConfigValueError, match=rf"command-line override .*{pattern}"):
        build_cfg(str(DIGITS_CONFIG), ["SOLVER.OPTIMIZER", value])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{DIGITS_CONFIG}"\nSOLVER:\n  OPTIMIZER: "{value}"\n')
    with pytest.raises(ConfigValueError, match=rf"config file {re.escape(str(bad))}: {pattern}"):
        build_cfg(str(bad))


def test_unknown_optimizer_in_a_config_built_by_hand_fails_in_build_optimizer():
    cfg = build_cfg("", freeze=False)
    cfg.SOLVER.OPTIMIZER = "Lion"
    with pytest.raises(ConfigValueError, match=r"SOLVER\.OPTIMIZER 'Lion' is not one of"):
        Trainer.build_optimizer(cfg, _tiny_module())


@pytest.mark.parametrize("betas", ["(0.9,)", "(0.9, 1.0)", "(-0.1, 0.999)", "(0.9, 0.99, 0.9)"])
def test_bad_betas_fail_when_the_config_is_built(betas):
    with pytest.raises(ConfigValueError, match=r"SOLVER\.BETAS .* two numbers in \[0, 1\)"):
        build_cfg("", ["SOLVER.BETAS", betas])


# ------------------------------------------------------------------------------ resume


ADAMW_OPTS = ["SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "0.001", "SOLVER.STEPS", "(3,)"]


def test_adamw_resume_is_bit_identical(coco_dataset, tmp_path):
    """AdamW's moments and step counts go through the checkpoint: a run killed after iteration
    2 (checkpoint after iteration 1) and resumed ends with the uninterrupted run's weights and
    optimizer state, bit for bit."""
    dataset = coco_dataset("adamw_train", sizes=VARIED_SIZES).name
    full = make_trainer(training_cfg(tmp_path / "full", dataset, 4, ADAMW_OPTS))
    assert type(full.optimizer) is torch.optim.AdamW
    full.train()

    out = tmp_path / "interrupted"
    first = make_trainer(training_cfg(out, dataset, 4, ADAMW_OPTS))
    first.register_hooks([KillAfter(2)])
    with pytest.raises(Killed):
        first.train()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    resumed = make_trainer(training_cfg(out, dataset, 4, ADAMW_OPTS), resume=True)
    assert resumed.start_iter == 2
    resumed.train()

    def load(path):
        return torch.load(path, map_location="cpu", weights_only=False)

    a, b = load(out / "model_final.pth"), load(tmp_path / "full" / "model_final.pth")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    state_a = a["trainer"]["_trainer"]["optimizer"]["state"]
    state_b = b["trainer"]["_trainer"]["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for k in state_a:
        assert set(state_a[k]) >= {"exp_avg", "exp_avg_sq", "step"}
        assert float(state_a[k]["step"]) == 4.0
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(state_a[k][key]), torch.as_tensor(state_b[k][key]))
    assert not math.isnan(float(state_a[0]["exp_avg"].abs().sum()))
