"""Set-up contract: Detectron2 imports in both worlds (with and without compiled ops),
the install step is a no-op on a second run, and Detectron2's model zoo works."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_pure_python_world_imports_engine_and_evaluation():
    out = run_python(
        """
        import gfocalv2, detectron2.engine, detectron2.evaluation
        from gfocalv2.compat import COMPAT_STATE, CompiledOpsUnavailable
        from pycocotools.cocoeval import COCOeval
        from detectron2.evaluation import coco_evaluation
        assert COMPAT_STATE["compiled_ops"] is False
        assert coco_evaluation.COCOeval_opt is COCOeval
        import detectron2._C as C
        try:
            C.COCOevalAccumulate
        except CompiledOpsUnavailable as e:
            assert "COCOevalAccumulate" in str(e) and "build Detectron2" in str(e)
        else:
            raise AssertionError("stand-in op did not raise")
        print("ok", sorted(COMPAT_STATE["patches"]))
        """
    )
    assert out.startswith("ok")


def test_compiled_world_is_left_untouched():
    """With a compiled detectron2._C present (simulated), compat changes nothing."""
    out = run_python(
        """
        import sys, types
        import numpy as np
        from PIL import Image
        fake = types.ModuleType("detectron2._C")
        fake.__file__ = "/fake/_C.so"
        sys.modules["detectron2._C"] = fake
        had_linear = hasattr(Image, "LINEAR")
        had_int = hasattr(np, "int")
        import importlib.util  # load compat alone: the package would go on to import Detectron2 0.6
        spec = importlib.util.spec_from_file_location("compat", "gfocalv2/compat.py")
        compat = importlib.util.module_from_spec(spec); spec.loader.exec_module(compat)
        state = compat.apply()
        assert state["compiled_ops"] is True and state["patches"] == [], state
        assert sys.modules["detectron2._C"] is fake
        assert hasattr(Image, "LINEAR") == had_linear and hasattr(np, "int") == had_int
        assert "detectron2.evaluation" not in sys.modules
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_model_zoo_without_pkg_resources():
    """setuptools >= 81 has no pkg_resources: Detectron2's model zoo still finds its configs."""
    out = run_python(
        """
        import sys
        sys.modules["pkg_resources"] = None  # as if setuptools did not ship it
        import gfocalv2
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
    if not os.path.exists(os.path.join(REPO, ".venv", ".gfocalv2-installed")):
        pytest.skip("not running from the Makefile's .venv")
    proc = subprocess.run(["make", "-q", "install"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, "make install would run again: " + proc.stdout + proc.stderr
    dry = subprocess.run(["make", "-n", "install"], cwd=REPO, capture_output=True, text=True)
    assert "pip install" not in dry.stdout


def test_package_is_installed_as_distributions():
    from importlib.metadata import distribution

    assert distribution("detectron2").version.startswith("0.6") or distribution("detectron2").version
    assert distribution("gfocalv2").version
