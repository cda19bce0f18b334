"""Config merging whose errors name the key, the file and the value, with close matches for
misspelt keys, and checks of the values that a merge cannot check.

Detectron2 (yacs) reports an unknown key as ``KeyError: 'Non-existent config key: X'``
(from a file) or ``AssertionError: Non-existent key: X`` (from ``KEY VALUE`` overrides),
without the file, and a wrong type as ``Type mismatch (...)``. :func:`merge_config_file`
and :func:`merge_config_list` do the same merges and re-raise these as
:class:`UnknownConfigKeyError` (a ``KeyError``) / :class:`ConfigValueError` (a
``ValueError``) whose message names the key, where it came from, what was expected,
and suggests close matches. They also check the keys of this project that take one of a
few values (:func:`check_config_values`: ``INPUT.RESIZE_BACKEND``, ``SOLVER.OPTIMIZER``,
``SOLVER.BETAS``), so that a bad value fails when the config is built, naming where it came
from and the allowed values.
"""

import difflib
import logging
import os
import re

from detectron2.config import CfgNode

from .data.transforms import check_resize_backend

__all__ = [
    "OPTIMIZERS",
    "check_optimizer",
    "check_solver_steps",
    "merge_config_file",
    "merge_config_list",
    "all_config_keys",
    "check_config_values",
    "ConfigError",
    "UnknownConfigKeyError",
    "ConfigValueError",
]

logger = logging.getLogger(__name__)


class ConfigError(Exception):
    """Base of the config errors below; ``str()`` is the plain message."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class UnknownConfigKeyError(ConfigError, KeyError):
    """A config file or override names a key the config does not have."""


class ConfigValueError(ConfigError, ValueError):
    """A config value has the wrong type (or cannot be parsed)."""


def all_config_keys(cfg, prefix=""):
    """Every full key (``A.B.C``) of ``cfg``, nodes included."""
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, CfgNode):
            keys.extend(all_config_keys(v, full + "."))
    return keys


def _suggest(cfg, key, n=3):
    keys = all_config_keys(cfg)
    matches = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    if (
        not matches
    ):  # same last component elsewhere (e.g. MODEL.NUM_CLASSES -> MODEL.GFOCAL.NUM_CLASSES)
        last = key.split(".")[-1]
        matches = [k for k in keys if k.split(".")[-1] == last][:n]
    if not matches:
        lasts = {}
        for k in keys:
            lasts.setdefault(k.split(".")[-1], k)
        matches = [
            lasts[m]
            for m in difflib.get_close_matches(key.split(".")[-1], list(lasts), n=n, cutoff=0.75)
        ]
    return matches


def _unknown_key_error(cfg, key, source):
    matches = _suggest(cfg, key)
    hint = f" Did you mean {' or '.join(matches)}?" if matches else ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node_keys = ""
    if parent:
        node = cfg
        for part in parent.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, CfgNode):
            node_keys = f" The keys of {parent} are: {', '.join(sorted(node.keys()))}."
    return UnknownConfigKeyError(
        f"{source}: unknown config key {key}.{hint}{node_keys} (Keys of gfocalv2 exist once "
        "gfocalv2.add_gfocalv2_config / gfocalv2.engine.build_cfg has run.)"
    )


_TYPE_RE = re.compile(
    r"Type mismatch \((?P<want><class '[^']+'>|[^ ]+) vs\. (?P<got><class '[^']+'>|[^ ]+)\) with "
    r"values \((?P<old>.*) vs\. (?P<new>.*)\) for config key: (?P<key>\S+)"
)


def _type_name(s):
    m = re.match(r"<class '([^']+)'>", s)
    return m.group(1) if m else s


def _value_error(e, source):
    m = _TYPE_RE.search(str(e))
    if not m:
        return ConfigValueError(f"{source}: {e}")
    want, got, key = _type_name(m["want"]), _type_name(m["got"]), m["key"]
    hint = ""
    if want == "float" and got == "int":
        hint = f" Write it as a float, e.g. {m['new']}.0."
    elif want in ("tuple", "list"):
        hint = ' Write a list, e.g. (1, 2) or [1, 2] (quoted on the command line: KEY "(1, 2)").'
    return ConfigValueError(
        f"{source}: config key {key} must be of type {want} (default: {m['old']}), "
        f"got {m['new']!s} of type {got}.{hint}"
    )


def _missing_file_error(path, what):
    path = str(path)
    parent = os.path.dirname(os.path.abspath(path)) or "."
    hint = ""
    if os.path.isdir(parent):
        candidates = [f for f in os.listdir(parent) if f.endswith((".yaml", ".yml", ".py"))]
        close = difflib.get_close_matches(os.path.basename(path), candidates, n=3, cutoff=0.5)
        if close:
            hint = (
                " Did you mean "
                + " or ".join(os.path.join(os.path.dirname(path), c) for c in close)
                + "?"
            )
    else:
        hint = f" (its directory {parent} does not exist either)"
    return FileNotFoundError(f"{what} {path} does not exist.{hint}")


#: The values of ``SOLVER.OPTIMIZER`` (``Trainer.build_optimizer``, gfocalv2/engine/trainer.py).
OPTIMIZERS = ("SGD", "AdamW")


def check_optimizer(cfg, source="config"):
    """``cfg.SOLVER.OPTIMIZER`` if it is one of :data:`OPTIMIZERS` and ``cfg.SOLVER.BETAS`` two
    numbers in [0, 1); else a :class:`ConfigValueError` naming ``source``, the key, the value
    and what is allowed."""
    name = cfg.SOLVER.OPTIMIZER
    if name not in OPTIMIZERS:
        allowed = ", ".join(repr(o) for o in OPTIMIZERS)
        raise ConfigValueError(
            f"{source}: SOLVER.OPTIMIZER {name!r} is not one of {allowed} ('SGD': Detectron2's, "
            "with SOLVER.MOMENTUM; 'AdamW': torch.optim.AdamW, with SOLVER.BETAS)"
        )
    betas = tuple(cfg.SOLVER.BETAS)
    if len(betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    ):
        raise ConfigValueError(
            f"{source}: SOLVER.BETAS {betas} must be two numbers in [0, 1), e.g. (0.9, 0.999)"
        )
    return name


def check_config_values(cfg, source="config"):
    """Check the keys of this project whose value is one of a few choices (``INPUT.RESIZE_BACKEND``:
    see ``gfocalv2/data/transforms.py``; ``SOLVER.OPTIMIZER`` and ``SOLVER.BETAS``); a bad value
    is a :class:`ConfigValueError` naming ``source``, the key, the value and the allowed
    values."""
    try:
        check_resize_backend(cfg.INPUT.RESIZE_BACKEND, source)
    except ValueError as e:
        raise ConfigValueError(str(e)) from None
    check_optimizer(cfg, source)
    return cfg


def merge_config_file(cfg, config_file):
    """``cfg.merge_from_file(config_file)`` with errors that name the file, the key and
    close matches."""
    config_file = str(config_file)
    if not os.path.isfile(config_file):
        raise _missing_file_error(config_file, "config file")
    import yaml

    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        msg = str(e.args[0]) if e.args else str(e)
        m = re.search(r"Non-existent config key: (\S+)", msg)
        if m:
            raise _unknown_key_error(cfg, m.group(1), f"config file {config_file}") from None
        raise ConfigValueError(f"config file {config_file}: {msg}") from e
    except ValueError as e:
        raise _value_error(e, f"config file {config_file}") from None
    except AssertionError as e:  # yacs asserts (e.g. a key of a deprecated/renamed node)
        raise ConfigValueError(f"config file {config_file}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigValueError(f"config file {config_file} is not valid YAML: {e}") from None
    except FileNotFoundError as e:  # a _BASE_ that does not exist
        raise FileNotFoundError(
            f"config file {config_file} (or one of its _BASE_ files) refers to {e.filename}, which "
            "does not exist. _BASE_ paths are relative to the file that names them."
        ) from None
    return check_config_values(cfg, f"config file {config_file}")


def merge_config_list(cfg, opts, source="command-line override"):
    """``cfg.merge_from_list(opts)`` with errors that name the key, the value and close matches."""
    opts = [str(o) if not isinstance(o, str) else o for o in (opts or [])]
    if len(opts) % 2:
        raise ConfigValueError(
            f"{source}s must be KEY VALUE pairs, got an odd number of items: {opts}. "
            'Put them after all --flags, and quote values with spaces: SOLVER.STEPS "(100, 200)"'
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except AssertionError as e:
            if "Non-existent key" in str(e):
                raise _unknown_key_error(cfg, key, f"{source} {key} {value}") from None
            raise ConfigValueError(f"{source} {key} {value}: {e}") from None
        except KeyError:
            raise _unknown_key_error(cfg, key, f"{source} {key} {value}") from None
        except ValueError as e:
            raise _value_error(e, f"{source} {key} {value}") from None
        check_config_values(cfg, f"{source} {key} {value}")
    return cfg


def check_solver_steps(cfg: CfgNode) -> CfgNode:
    """Check ``SOLVER.STEPS`` of the step schedule (``SOLVER.LR_SCHEDULER_NAME``
    "WarmupMultiStepLR") against ``SOLVER.MAX_ITER``; ``cfg`` must not be frozen.

    Steps that are not positive or not increasing are an error (:class:`ConfigValueError`
    naming SOLVER.STEPS). Steps at or after ``SOLVER.MAX_ITER`` never take effect (Detectron2's
    semantics), but fvcore's scheduler refuses a step equal to MAX_ITER with a traceback
    ("Milestone must be smaller than total number of updates"): they are dropped here, with
    one warning, so that a shortened schedule (e.g. ``SOLVER.MAX_ITER 8``) trains.
    Other schedulers do not read SOLVER.STEPS and are left alone. Returns ``cfg``.
    """
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        return cfg
    steps = tuple(solver.STEPS)
    if any(s <= 0 for s in steps):
        raise ConfigValueError(
            f"SOLVER.STEPS {steps}: the iterations at which the learning rate drops must be "
            "positive"
        )
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ConfigValueError(
            f"SOLVER.STEPS {steps}: the iterations at which the learning rate drops must be "
            f"strictly increasing, e.g. {tuple(sorted(set(steps)))}"
        )
    max_iter = solver.MAX_ITER
    dropped = tuple(s for s in steps if s >= max_iter)
    if dropped:
        kept = tuple(s for s in steps if s < max_iter)
        logger.warning(
            "SOLVER.STEPS %s: %s at or after SOLVER.MAX_ITER %d never take effect and are dropped "
            "(SOLVER.STEPS is now %s)",
            steps,
            dropped,
            max_iter,
            kept,
        )
        solver.STEPS = kept
    return cfg
