"""gfocalv2.engine.train_step on its own, with a tiny module returning a loss dict: GuardedModel
(loss check, stop agreement, BatchNorm statistics restored after a failed step, CPU autocast,
attributes forwarded to the model) and check_gradients_before_update (the optimizer step
pre-hook that refuses non-finite gradients)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from gfocalv2.engine.train_step import (
    GuardedModel,
    NonFiniteLossError,
    check_gradients_before_update,
)

IMAGES = ["image_id 7 (scenes/a.png)", "image_id 9 (scenes/b.png)"]


class TinyDetector(nn.Module):
    """Linear -> BatchNorm on the batch's "x"; two loss terms. ``poison = (term, factor)``
    multiplies one term by ``factor`` (NaN or inf); ``fail`` makes the forward pass raise."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.poison = None
        self.fail = False
        self.linear_dtypes = []  # dtype of the Linear layer's output at each call
        self.returned = None  # the loss dict of the last call

    def forward(self, batch):
        if self.fail:
            raise RuntimeError("forward failed")
        y = self.linear(torch.stack([d["x"] for d in batch]))
        self.linear_dtypes.append(y.dtype)
        y = self.norm(y.float())
        losses = {"loss_a": (y - 1).pow(2).mean(), "loss_b": (y + 2).abs().mean()}
        if self.poison:
            term, factor = self.poison
            losses[term] = losses[term] * factor
        self.returned = losses
        return losses


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(4, generator=g), "image_id": 7, "file_name": "scenes/a.png"},
        {"x": torch.randn(4, generator=g), "image_id": 9, "file_name": "scenes/b.png"},
    ]


def guarded(model=None, iteration=12, **kwargs):
    model = TinyDetector().train() if model is None else model
    return model, GuardedModel(model, lambda: iteration, **kwargs)


def running_stats(model):
    return {k: v.clone() for k, v in model.norm.state_dict().items()}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- GuardedModel
def test_finite_losses_pass_through_unchanged():
    model, guard = guarded()
    reference = copy.deepcopy(model)
    losses = guard(batch())
    assert losses is model.returned  # the model's own dict
    expected = reference(batch())
    assert losses.keys() == expected.keys() and all(
        torch.equal(losses[k], expected[k]) for k in losses
    )
    assert guard.returned and guard.last_batch == IMAGES
    assert guard.last_losses.keys() == losses.keys()
    assert all(
        torch.equal(guard.last_losses[k], losses[k]) and not guard.last_losses[k].requires_grad
        for k in losses
    )


@pytest.mark.parametrize(
    "factor, shown", [(float("nan"), "nan"), (float("inf"), "inf")], ids=["nan", "inf"]
)
def test_non_finite_loss_raises_naming_iteration_terms_and_images(factor, shown):
    model, guard = guarded(iteration=12)
    reference = copy.deepcopy(model)
    loss_a = reference(batch())["loss_a"].item()
    model.poison = ("loss_b", factor)
    guard.begin_step()
    with pytest.raises(FloatingPointError) as e:
        guard(batch())
    err = e.value
    assert isinstance(err, NonFiniteLossError)
    assert err.iteration == 12 and err.images == IMAGES
    assert (
        err.losses["loss_a"] == pytest.approx(loss_a, rel=1e-6)
        and str(err.losses["loss_b"]) == shown
    )
    message = str(err)
    assert message.startswith(
        f"Non-finite loss at iteration 12: loss_a={loss_a:.6g}, loss_b={shown}."
    )
    assert all(image in message for image in IMAGES)
    assert not guard.returned  # the step never got past the forward pass


def test_stop_agreed_follows_stop_requested():
    asked = {"stop": False}
    _, guard = guarded(stop_requested=lambda: asked["stop"])
    seen = []
    for stop in (False, True, True, False):
        asked["stop"] = stop
        guard(batch())
        seen.append(guard.stop_agreed)
    assert seen == [False, True, True, False]


def test_restore_buffers_undoes_the_statistics_of_the_failed_forward():
    model, guard = guarded()
    initial = running_stats(model)
    guard.begin_step()
    guard(batch(0))  # a good step: its statistics stay
    after_good = running_stats(model)
    assert not same_tensors(after_good, initial)
    model.poison = ("loss_a", float("nan"))
    guard.begin_step()
    with pytest.raises(NonFiniteLossError):
        guard(batch(1))
    assert not same_tensors(running_stats(model), after_good)  # the failed forward did update them
    guard.restore_buffers()
    restored = running_stats(model)
    assert same_tensors(restored, after_good)  # exactly, num_batches_tracked included
    assert restored["num_batches_tracked"].item() == 1
    guard.restore_buffers()  # nothing left to restore: a no-op
    assert same_tensors(running_stats(model), after_good)


@pytest.mark.parametrize(
    "cpu_autocast, training, expected",
    [
        (True, True, torch.bfloat16),
        (False, True, torch.float32),
        (True, False, torch.float32),  # inference is not autocast by the guard
    ],
    ids=["autocast-training", "no-autocast", "autocast-inference"],
)
def test_cpu_autocast_runs_the_training_forward_in_bfloat16(cpu_autocast, training, expected):
    model, guard = guarded(cpu_autocast=cpu_autocast)
    model.train(training)
    losses = guard(batch())
    assert model.linear_dtypes == [expected]
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert not torch.is_autocast_enabled("cpu")  # only inside the forward pass


def test_attributes_are_the_models():
    model, guard = guarded()
    assert guard.module is model and guard.linear is model.linear and guard.training
    guard.poison = ("loss_a", 2.0)  # a write goes to the model
    assert model.poison == ("loss_a", 2.0)
    guard.eval()
    assert not model.training and not guard.training
    assert [n for n, _ in guard.named_parameters()] == [
        "linear.weight",
        "linear.bias",
        "norm.weight",
        "norm.bias",
    ]
    guard.cpu_autocast = True  # the guard's own state stays the guard's
    assert guard.cpu_autocast and "cpu_autocast" not in vars(model)
    assert guard.stop_agreed is False and not hasattr(model, "stop_agreed")


def test_a_failing_forward_with_non_finite_weights_names_the_divergence():
    model, guard = guarded(iteration=30)
    model.fail = True
    with pytest.raises(RuntimeError, match="^forward failed$"):  # finite weights: the error itself
        guard(batch())
    with torch.no_grad():
        model.linear.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="weights are not finite at iteration 30") as e:
        guard(batch())
    assert e.value.iteration == 30 and e.value.images == IMAGES
    assert isinstance(e.value.__cause__, RuntimeError)


# ------------------------------------------------------------- check_gradients_before_update
def _step_setup(lr=0.1, **hook_kwargs):
    model, guard = guarded(iteration=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    updates = []
    handle = check_gradients_before_update(
        optimizer, guard, lambda: 5, on_update=lambda: updates.append(1)
    )
    losses = guard(batch())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    return model, guard, optimizer, updates, handle


def _parameters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_gradient_refuses_the_update(bad):
    model, guard, optimizer, updates, _ = _step_setup()
    model.norm.bias.grad[1] = bad
    before = _parameters(model)
    with pytest.raises(NonFiniteLossError) as e:
        optimizer.step()
    assert same_tensors(_parameters(model), before)  # not applied, not even partly
    assert len(optimizer.state) == 0  # no momentum buffer either
    assert updates == []
    err = e.value
    assert err.iteration == 5 and err.images == IMAGES and set(err.losses) == {"loss_a", "loss_b"}
    message = str(err)
    assert (
        "Non-finite gradient at iteration 5" in message and "the update was not applied" in message
    )
    assert f"loss_a={err.losses['loss_a']:.6g}" in message and all(
        image in message for image in IMAGES
    )


def test_finite_gradients_update_once():
    model, _, optimizer, updates, _ = _step_setup(lr=0.1)
    before = _parameters(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    assert updates == [1]
    for name, p in model.named_parameters():  # SGD's first step: p - lr * grad
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * grads[name], rtol=0, atol=1e-7)
    # (the Linear layer's bias has a zero gradient: BatchNorm removes the mean)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == {"linear.weight", "norm.weight", "norm.bias"}


def test_removed_hook_checks_nothing():
    model, _, optimizer, updates, handle = _step_setup()
    handle.remove()
    model.norm.bias.grad[1] = float("nan")
    optimizer.step()  # no check any more: the update is applied
    assert updates == [] and torch.isnan(model.norm.bias[1])


def test_lr_scheduler_built_before_the_hook_sees_no_overridden_step():
    model, guard = guarded()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    updates = []
    check_gradients_before_update(optimizer, guard, lambda: 0, on_update=lambda: updates.append(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizer.zero_grad()
            sum(guard(batch()).values()).backward()
            optimizer.step()
            scheduler.step()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "optimizer.step()" in m or "overridden" in m], messages
    assert updates == [1, 1] and optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
