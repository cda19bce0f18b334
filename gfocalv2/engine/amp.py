"""``SOLVER.AMP.ENABLED`` on a CPU: Detectron2's ``AMPTrainer`` requires CUDA (float16 with
a gradient scaler); on a CPU the trainer runs the forward pass under bfloat16 autocast
instead. bfloat16 has float32's exponent range, so no loss scaling is needed. The model
computes its losses in float32 either way."""
import time

import torch

from detectron2.engine import SimpleTrainer

__all__ = ["CPUAutocastTrainer", "CPUAutocastMixin"]


class CPUAutocastTrainer(SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` step with the forward pass under CPU bfloat16 autocast."""

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
            losses = loss_dict if isinstance(loss_dict, torch.Tensor) else sum(loss_dict.values())
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
        self.optimizer.zero_grad()
        losses.backward()
        if hasattr(self, "after_backward"):  # Detectron2 after v0.6: hooks' after_backward
            self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class CPUAutocastMixin:
    """Put before ``DefaultTrainer`` in a trainer's bases: with ``SOLVER.AMP.ENABLED`` and
    ``MODEL.DEVICE cpu`` the inner trainer is a :class:`CPUAutocastTrainer`."""

    def __init__(self, cfg):
        cpu_amp = cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"
        if cpu_amp:  # DefaultTrainer would build a CUDA-only AMPTrainer
            original, cfg = cfg, cfg.clone()
            cfg.defrost()
            cfg.SOLVER.AMP.ENABLED = False
            cfg.freeze()
        super().__init__(cfg)
        if cpu_amp:
            inner = self._trainer
            self._trainer = CPUAutocastTrainer(inner.model, inner.data_loader, inner.optimizer)
            self.cfg = original
