"""A DetectionCheckpointer that writes atomically and checks what it loads.

* Saving (``model_*.pth`` and ``last_checkpoint``): written to a temporary file in the same
  directory, flushed and fsync'ed, then ``os.replace``'d over the target (and the directory
  fsync'ed), so a crash while saving leaves either the old file or the new one, never a
  truncated one. Remote paths (``s3://``, ...) fall back to Detectron2's writer.
* Loading: a ``MODEL.WEIGHTS`` that does not exist is a ``FileNotFoundError`` naming it; a
  file that is not a readable checkpoint is a :class:`CheckpointError` naming it; on
  ``--resume``, an unreadable last checkpoint (e.g. truncated by a crash of an older
  version) falls back to the newest readable ``model_*.pth`` with a warning.
* Unmatched keys are reported the Detectron2 way (missing / unexpected / shape mismatches
  logged). A checkpoint that shares no parameter with the model is refused. A
  classification layer (``*cls_score*``) of another class count is refused unless
  ``allow_class_mismatch`` (``MODEL.REINIT_HEAD_ON_CLASS_MISMATCH True``), in which case it
  keeps its initialization, with a warning.
"""

import logging
import os
import re
import tempfile
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .modeling.inference_optimization import has_folded_batchnorm

__all__ = [
    "GFocalCheckpointer",
    "CheckpointError",
    "UnreadableCheckpointError",
    "NonFiniteWeightsError",
    "atomic_torch_save",
    "atomic_write_text",
    "checkpointer_for",
    "load_weights",
]

logger = logging.getLogger(__name__)

_CLASS_LAYER = re.compile(r"(^|\.)cls_score\.(weight|bias)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class NonFiniteWeightsError(FloatingPointError):
    """The weights to save are NaN/inf; the message names the last good checkpoint."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _finite_state(state):
    """True if every floating-point tensor of a state dict is finite (one synchronization)."""
    tensors = [v.detach() for v in state.values() if isinstance(v, torch.Tensor)]
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class UnreadableCheckpointError(CheckpointError):
    """The checkpoint file cannot be read (truncated, not a checkpoint)."""


def _is_local(path):
    return "://" not in str(path)


def _without_query(path):
    """``x.pkl`` for ``x.pkl?matching_heuristics=True`` (a query Detectron2 after v0.6 accepts)."""
    return urlparse(path)._replace(query="").geturl() if "?" in path else path


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not supported on some file systems
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write, mode):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    try:
        # mkstemp creates the file owner-only (0600); give it what open() would (0666 less the
        # umask), as Detectron2's plain torch.save does.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)`` that never leaves a partial ``path`` behind."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text), "w")


class GFocalCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and checked loads (see the module docstring)."""

    def __init__(
        self,
        model,
        save_dir="",
        *,
        save_to_disk=None,
        allow_class_mismatch=False,
        **checkpointables,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_class_mismatch = allow_class_mismatch

    # ------------------------------------------------------------------ saving
    def _refuse_folded_model(self, action):
        if has_folded_batchnorm(self.model):
            raise CheckpointError(
                f"Cannot {action}: this model was optimized for inference (its BatchNorms are "
                "folded into the convolutions, TEST.FOLD_BATCHNORM), so its parameters no longer "
                "match checkpoints. Load weights before optimizing: build a new model or Predictor "
                "with MODEL.WEIGHTS set."
            )

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        self._refuse_folded_model(f"save checkpoint {name}")
        if not _is_local(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        if not _finite_state(data["model"]):
            last = self.get_checkpoint_file() if self.has_checkpoint() else ""
            raise NonFiniteWeightsError(
                f"Not saving checkpoint {name}.pth: the model's weights are NaN/inf (training "
                f"diverged). The last good checkpoint is {last or '(none)'}: lower SOLVER.BASE_LR, "
                "lengthen SOLVER.WARMUP_ITERS or enable SOLVER.CLIP_GRADIENTS and resume from it "
                "with --resume."
            )
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # ----------------------------------------------------------------- loading
    def load(self, path, *args, **kwargs):
        if path:
            self._refuse_folded_model(f"load {path}")
        # Detectron2 after v0.6 (which has _parsed_url_during_load) strips a
        # "?matching_heuristics=True" query
        local = _without_query(path) if hasattr(self, "_parsed_url_during_load") else path
        if path and _is_local(path) and not os.path.isfile(local):
            raise FileNotFoundError(
                f"MODEL.WEIGHTS {path} does not exist. Give the path of a .pth/.pkl checkpoint "
                "(e.g. OUTPUT_DIR/model_final.pth), "
                'or MODEL.WEIGHTS "" to start from random weights.'
            )
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # Detectron2 after v0.6 records the URL being loaded in _parsed_url_during_load and
            # asserts that it is None when the next load starts, but leaves it set when a load
            # raises: without this, the checkpointer could not load anything after one unreadable
            # file (the --resume fallback below). v0.6 has no such attribute.
            if getattr(self, "_parsed_url_during_load", None) is not None:
                self._parsed_url_during_load = None

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as e:  # noqa: BLE001  (EOFError, UnpicklingError, RuntimeError from zip reader, ...)
            raise UnreadableCheckpointError(
                f"Cannot read checkpoint {filename} ({type(e).__name__}: {e}). The file is "
                "truncated or not a PyTorch/Detectron2 checkpoint; use another file (e.g. an "
                "earlier model_*.pth of the same run)."
            ) from e

    def resume_or_load(self, path, *, resume=True):
        if not (resume and self.has_checkpoint() and _is_local(self.save_dir)):
            return super().resume_or_load(path, resume=resume)
        last = self.get_checkpoint_file()
        try:
            if not last or last.rstrip("/") == self.save_dir.rstrip("/"):
                raise FileNotFoundError("last_checkpoint is empty")
            return self.load(last)
        except (UnreadableCheckpointError, FileNotFoundError) as e:
            problem = e
        candidates = sorted(
            (
                f
                for f in self.get_all_checkpoint_files()
                if os.path.abspath(f) != os.path.abspath(last or "")
            ),
            key=os.path.getmtime,
            reverse=True,
        )
        for cand in candidates:
            try:
                ret = self.load(cand)
            except UnreadableCheckpointError:
                continue
            logger.warning(
                "--resume: last_checkpoint in %s names %s, which cannot be used (%s); resumed from "
                "%s instead, the newest readable checkpoint there",
                self.save_dir,
                last or "(nothing)",
                problem,
                cand,
            )
            return ret
        raise CheckpointError(
            f"--resume: last_checkpoint in {self.save_dir} names {last or '(nothing)'}, which "
            f"cannot be used ({problem}), and no other readable model_*.pth is there. Delete "
            "last_checkpoint to start over from MODEL.WEIGHTS."
        )

    def _load_model(self, checkpoint):
        ckpt_state = checkpoint.get("model", {})
        model_state = self.model.state_dict()
        strip = lambda k: k[len("module.") :] if k.startswith("module.") else k  # noqa: E731
        if not checkpoint.get("matching_heuristics", False) and isinstance(ckpt_state, dict):
            ckpt_keys = {strip(k): v for k, v in ckpt_state.items()}
            shared = [k for k in model_state if k in ckpt_keys]
            if model_state and ckpt_keys and not shared:
                raise CheckpointError(
                    "The checkpoint shares no parameter name with the model "
                    f"({type(self.model).__name__}): e.g. checkpoint {sorted(ckpt_keys)[:3]} vs "
                    f"model {sorted(model_state)[:3]}. It is for another architecture; check "
                    "MODEL.WEIGHTS and MODEL.META_ARCHITECTURE (convert published weights with "
                    "python -m gfocalv2.convert)."
                )
            mismatched = [
                (k, tuple(ckpt_keys[k].shape), tuple(model_state[k].shape))
                for k in shared
                if _CLASS_LAYER.search(k)
                and hasattr(ckpt_keys[k], "shape")
                and tuple(ckpt_keys[k].shape) != tuple(model_state[k].shape)
            ]
            if mismatched:
                desc = ", ".join(
                    f"{k}: {a} in the checkpoint, {b} in the model" for k, a, b in mismatched
                )
                if not self.allow_class_mismatch:
                    raise CheckpointError(
                        "The checkpoint's classification layer is for another number of classes "
                        f"({desc}). Set MODEL.*.NUM_CLASSES to the checkpoint's, or, to fine-tune "
                        "these weights on a dataset with other classes, set "
                        "MODEL.REINIT_HEAD_ON_CLASS_MISMATCH True (the layer is then "
                        "re-initialized)."
                    )
                logger.warning(
                    "MODEL.REINIT_HEAD_ON_CLASS_MISMATCH: re-initializing the classification layer "
                    "(%s)",
                    desc,
                )
        return super()._load_model(checkpoint)


def checkpointer_for(cfg, model, save_dir="", **checkpointables):
    """A :class:`GFocalCheckpointer` with ``allow_class_mismatch`` from the config."""
    return GFocalCheckpointer(
        model,
        save_dir,
        allow_class_mismatch=cfg.MODEL.REINIT_HEAD_ON_CLASS_MISMATCH,
        **checkpointables,
    )


def load_weights(model, cfg, weights=None):
    """Load ``weights`` (default ``cfg.MODEL.WEIGHTS``) into ``model`` with the checks of
    :class:`GFocalCheckpointer` (missing file, unreadable file, other architecture, other class
    count); every tool loads weights this way. An empty path leaves the model as initialized,
    with a warning. Returns ``model``."""
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialization")
        return model
    checkpointer_for(cfg, model).load(weights)
    return model
