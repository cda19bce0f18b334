"""Set-up contract: the install step is a no-op on a second run, and Detectron2's model zoo works
(with or without setuptools' pkg_resources). What gfocalv2.compat does in each world:
test_compat.py."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_model_zoo_without_pkg_resources():
    """setuptools >= 81 has no pkg_resources: Detectron2's model zoo still finds its configs."""
    out = run_python(
        """
        import sys
        sys.modules["pkg_resources"] = None  # as if setuptools did not ship it
        from gfocalv2 import compat
        compat.apply()
        from detectron2 import model_zoo
        path = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
        print(path)
        """
    )
    assert out.strip().endswith("retinanet_R_50_FPN_1x.yaml")


def test_detectron2_model_zoo_config_builds_and_runs():
    import torch
    from detectron2 import model_zoo
    from detectron2.modeling import build_model

    cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 64, 64) * 255}])
    assert "instances" in out[0]


def test_install_step_is_a_noop_on_second_run():
    """`make test` begins with `make install`; once installed, that target is up to date."""
    venv = os.path.join(REPO, ".venv")
    if not os.path.exists(os.path.join(venv, ".gfocalv2-installed")) or os.path.realpath(
        sys.prefix
    ) != os.path.realpath(venv):
        pytest.skip("not running from the Makefile's .venv")
    proc = subprocess.run(
        ["make", "-q", "install"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, "make install would run again: " + proc.stdout + proc.stderr
    dry = subprocess.run(
        ["make", "-n", "install"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert "pip install" not in dry.stdout


def test_package_is_installed_as_distributions():
    """Detectron2 and gfocalv2 are installed distributions (pip knows them) whose versions are
    the ones their imported modules report: Detectron2 0.6 (the v0.6 tag, main and the
    registries' pure-Python build all call themselves 0.6), gfocalv2 its ``__version__``."""
    from importlib.metadata import distribution

    import detectron2
    import gfocalv2
    from packaging.version import Version

    d2 = Version(distribution("detectron2").version)
    assert d2.release[:2] == (0, 6), d2
    assert Version(detectron2.__version__) == d2
    assert Version(distribution("gfocalv2").version) == Version(gfocalv2.__version__)
