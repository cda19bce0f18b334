"""gfocalv2.compat: each fix is applied exactly when its own need exists, and never otherwise.

Each case builds a small stand-in ``detectron2`` package tree (only the files whose text the
needs are read from) with the traits of one Detectron2 version, then runs ``compat.apply()``
alone in a fresh interpreter with that tree first on the path.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

V06_TRANSFORM = (
    "class ExtentTransform:\n"
    "    def __init__(self, src_rect, output_size, interp=Image.LINEAR, fill=0): pass\n"
)
MAIN_TRANSFORM = (
    "class ExtentTransform:\n"
    "    def __init__(self, src_rect, output_size, interp=Image.BILINEAR, fill=0): pass\n"
)
MODEL_ZOO = "import pkg_resources\n"


def make_detectron2(
    root, *, compiled, transform=MAIN_TRANSFORM, model_zoo=MODEL_ZOO, numpy_uses=""
):
    files = {
        "__init__.py": '__version__ = "0.6"\n',
        "modeling/__init__.py": "",
        "data/transforms/transform.py": transform,
        "model_zoo/model_zoo.py": model_zoo,
        "structures/masks.py": numpy_uses,
        # What the pycocotools fix rewires when there are no compiled ops.
        "evaluation/__init__.py": "",
        "evaluation/fast_eval_api.py": "COCOeval_opt = 'compiled'\n",
        "evaluation/coco_evaluation.py": "from .fast_eval_api import COCOeval_opt\n",
    }
    if compiled:
        files["_C.py"] = "COMPILED = True\n"  # found by find_spec like the real extension
    for rel, text in files.items():
        path = os.path.join(root, "detectron2", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return str(root)


def run_apply(tree, before=""):
    """compat.apply() in a fresh interpreter with ``tree`` first on sys.path; returns what it
    saw."""
    # the script's longest lines, spliced into the block below as they are
    had = (
        '{"linear": hasattr(Image, "LINEAR"), "np_int": "int" in vars(np), '
        '"np_float": "float" in vars(np)}'
    )
    compat_py = os.path.join(REPO, "gfocalv2", "compat.py")
    coco_eval = 'None if fe is None else getattr(fe.COCOeval_opt, "__module__", fe.COCOeval_opt)'
    code = f"import sys, json\nsys.path.insert(0, {tree!r})\n{before}\n" + textwrap.dedent(
        f"""
        import numpy as np
        from PIL import Image
        had = {had}
        import importlib.util
        spec = importlib.util.spec_from_file_location("compat", {compat_py!r})
        compat = importlib.util.module_from_spec(spec); spec.loader.exec_module(compat)
        state = compat.apply()
        import detectron2
        assert detectron2.__file__.startswith({tree!r}), detectron2.__file__
        C = sys.modules.get("detectron2._C")
        fe = sys.modules.get("detectron2.evaluation.coco_evaluation")
        print(json.dumps({{
            "patches": state["patches"], "compiled": state["compiled_ops"], "had": had,
            "standin": bool(getattr(C, "_GFOCALV2_STANDIN", False)),
            "coco_eval": {coco_eval},
            "pkg_resources": getattr(sys.modules.get("pkg_resources"), "__doc__", None),
        }}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tree), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


BLOCK_PKG_RESOURCES = 'sys.modules["pkg_resources"] = None  # as with setuptools >= 81'
HAVE_PKG_RESOURCES = (
    'import types; sys.modules["pkg_resources"] = types.ModuleType("pkg_resources", "setuptools")'
)


def test_official_main_with_pkg_resources_needs_nothing(tmp_path):
    seen = run_apply(make_detectron2(tmp_path, compiled=True), before=HAVE_PKG_RESOURCES)
    assert seen["compiled"] is True and seen["patches"] == []
    assert not seen["standin"] and seen["coco_eval"] is None  # evaluation not even imported
    assert seen["pkg_resources"] == "setuptools"


def test_official_main_without_pkg_resources_gets_only_that_fix(tmp_path):
    """The case of issue 11: compiled ops present, setuptools >= 81."""
    seen = run_apply(make_detectron2(tmp_path, compiled=True), before=BLOCK_PKG_RESOURCES)
    assert seen["patches"] == ["pkg_resources.resource_filename"]
    assert not seen["standin"] and seen["coco_eval"] is None
    assert "gfocalv2.compat" in seen["pkg_resources"]


def test_pkg_resources_is_left_alone_when_the_model_zoo_does_not_import_it(tmp_path):
    tree = make_detectron2(tmp_path, compiled=True, model_zoo="import importlib.resources\n")
    seen = run_apply(tree, before=BLOCK_PKG_RESOURCES)
    assert seen["patches"] == [] and seen["pkg_resources"] is None


def test_pillow_linear_only_where_detectron2_uses_it(tmp_path):
    before = (
        HAVE_PKG_RESOURCES
        + "\nfrom PIL import Image\nImage.__dict__.pop('LINEAR', None)  # Pillow >= 10"
    )
    v06 = run_apply(
        make_detectron2(tmp_path / "v06", compiled=True, transform=V06_TRANSFORM), before=before
    )
    main = run_apply(
        make_detectron2(tmp_path / "main", compiled=True, transform=MAIN_TRANSFORM), before=before
    )
    assert v06["patches"] == ["PIL.Image.LINEAR"]
    assert main["patches"] == []
    # A Pillow that still has LINEAR needs nothing, even for v0.6's transform.
    old_pillow = HAVE_PKG_RESOURCES + "\nfrom PIL import Image\nImage.LINEAR = Image.BILINEAR"
    seen = run_apply(
        make_detectron2(tmp_path / "old", compiled=True, transform=V06_TRANSFORM), before=old_pillow
    )
    assert seen["patches"] == []


def test_numpy_aliases_only_those_missing_and_used(tmp_path):
    before = (
        HAVE_PKG_RESOURCES
        + "\nimport numpy as np\nfor n in ('int', 'float'): np.__dict__.pop(n, None)"
    )
    uses = "x = np.zeros(3, dtype=np.int)\ny = np.float64(1)  # np.float64 is not an alias\n"
    seen = run_apply(make_detectron2(tmp_path / "a", compiled=True, numpy_uses=uses), before=before)
    assert seen["patches"] == ["numpy.int"], seen
    none_used = run_apply(
        make_detectron2(tmp_path / "b", compiled=True, numpy_uses="np.int64\n"), before=before
    )
    assert none_used["patches"] == []
    # NumPy still has np.int (older NumPy): nothing to restore although Detectron2 uses it.
    old_numpy = HAVE_PKG_RESOURCES + "\nimport numpy as np\nnp.int = int"
    seen = run_apply(
        make_detectron2(tmp_path / "c", compiled=True, numpy_uses=uses), before=old_numpy
    )
    assert seen["patches"] == []


def test_without_compiled_ops_standin_and_pycocotools(tmp_path):
    seen = run_apply(make_detectron2(tmp_path, compiled=False), before=HAVE_PKG_RESOURCES)
    assert seen["compiled"] is False and seen["standin"]
    assert seen["patches"] == [
        "detectron2._C stand-in",
        "COCOeval_opt -> faster-coco-eval COCOeval_faster",
    ]
    assert seen["coco_eval"] == "compat"  # its faster-coco-eval class (compat.py runs as "compat")


def test_registry_detectron2_v06_gets_every_fix_it_needs(tmp_path):
    """The pure-Python v0.6 with today's Pillow, NumPy and setuptools: all five fixes."""
    before = BLOCK_PKG_RESOURCES + "\nfrom PIL import Image\nImage.__dict__.pop('LINEAR', None)"
    before += "\nimport numpy as np\nnp.__dict__.pop('int', None)"
    tree = make_detectron2(tmp_path, compiled=False, transform=V06_TRANSFORM, numpy_uses="np.int\n")
    seen = run_apply(tree, before=before)
    assert seen["patches"] == [
        "PIL.Image.LINEAR",
        "numpy.int",
        "pkg_resources.resource_filename",
        "detectron2._C stand-in",
        "COCOeval_opt -> faster-coco-eval COCOeval_faster",
    ]


def test_importing_gfocalv2_prints_nothing():
    """A quiet console: no library deprecation warnings at import (torch.jit.script in
    fvcore/Detectron2), after the entry points' compat.apply()."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gfocalv2 import compat; compat.apply(); "
            "import gfocalv2.engine, detectron2.engine, detectron2.evaluation",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr == "", proc.stderr[-3000:]


def test_a_training_step_and_inference_print_nothing():
    """Library warnings on the first forward (Detectron2's anchor generator calls torch.meshgrid
    without indexing=) are not shown to the user either."""
    code = textwrap.dedent(
        """
        from gfocalv2 import compat
        compat.apply()  # first, as the README says
        import gfocalv2.modeling
        import torch
        from detectron2.modeling import build_model
        from tests.utils.models import gfocal_cfg, random_input
        torch.manual_seed(0)
        model = build_model(gfocal_cfg(tiny=True)).train()
        g = torch.Generator().manual_seed(0)
        losses = model([random_input(g, 64, 64, 2, 3)])
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            model([{"image": torch.rand(3, 64, 64) * 255}])
        """
    )
    from tests.utils.workflow import env_with_repo_on_pythonpath  # the code imports tests.utils

    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env_with_repo_on_pythonpath(), "PYTHONWARNINGS": "default"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr == "", proc.stderr[-3000:]


def test_the_installed_detectron2_is_handled_as_what_it_is():
    """Whatever Detectron2 is installed (pure-Python 0.6, or official v0.6/main built from
    source)."""
    import detectron2.evaluation.coco_evaluation as coco_evaluation
    from gfocalv2.compat import COMPAT_STATE, has_compiled_ops

    if has_compiled_ops():
        assert COMPAT_STATE["compiled_ops"] is True
        assert "detectron2._C stand-in" not in COMPAT_STATE["patches"]
        assert coco_evaluation.COCOeval_opt.__module__.startswith("detectron2")
        import detectron2._C

        assert hasattr(detectron2._C, "COCOevalAccumulate")
    else:
        from faster_coco_eval import COCOeval_faster
        from gfocalv2.compat import CompiledOpsUnavailable

        assert COMPAT_STATE["compiled_ops"] is False
        assert issubclass(coco_evaluation.COCOeval_opt, COCOeval_faster)
        with pytest.raises(CompiledOpsUnavailable, match="COCOevalAccumulate.*build Detectron2"):
            _ = sys.modules["detectron2._C"].COCOevalAccumulate
