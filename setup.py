#!/usr/bin/env python
"""gfocalv2: Generalized Focal Loss V2 (and V1) as a Detectron2 project extension."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(here, "gfocalv2", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("gfocalv2/__init__.py has no __version__")


def read_readme():
    path = os.path.join(here, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


setup(
    name="gfocalv2",
    version=read_version(),
    description="GFocalV2 / GFL dense object detectors for Detectron2",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gfocalv2", "gfocalv2.*"]),
    package_data={"gfocalv2": ["model_zoo/configs/**/*.yaml"]},
    # Tested with Python 3.11 only; the pinned torch 2.14.1 of requirements.txt (and
    # faster-coco-eval) need >= 3.10.
    python_requires=">=3.10",
    # Detectron2 itself is not declared: PyPI has no installable 'detectron2'
    # distribution, and users often build it from source. tools/install_detectron2.py
    # (run by `make install`) provides one when none is installed.
    install_requires=[
        # torch.library.custom_op / register_fake (the exported NMS operator) are torch >= 2.4,
        # whose torchvision is 0.19. Tested with torch 2.14.1 / torchvision 0.29.1 only.
        "torch>=2.4",
        "torchvision>=0.19",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
        # COCO evaluation without compiled ops (pycocotools does it, slower, where it is missing)
        "faster-coco-eval>=1.8.0",
        "numpy",
        "Pillow",
        "opencv-python-headless",
        "matplotlib",
    ],
    extras_require={
        "export": ["onnx", "onnxruntime", "onnxscript"],
        "demo": ["scikit-learn"],
        # timm backbones (build_timm_fpn_backbone) and `gfocalv2.convert timm`
        "timm": ["timm>=1.0", "safetensors"],
        "test": [
            "pytest",
            "pytest-timeout",
            "scikit-learn",
            "onnx",
            "onnxruntime",
            "onnxscript",
            "timm>=1.0",
            "safetensors",
        ],
    },
    entry_points={
        "console_scripts": [
            "gfocalv2-demo=gfocalv2.demo:main",
            "gfocalv2-convert=gfocalv2.convert:main",
            "gfocalv2-benchmark=gfocalv2.benchmark:main",
            "gfocalv2-export=gfocalv2.export:main",
        ]
    },
    license="Apache-2.0",
)
