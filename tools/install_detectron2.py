#!/usr/bin/env python
"""Make ``import detectron2`` work in the current Python environment.

* If an importable Detectron2 is already installed (for example the official
  one built from source, with its compiled ``detectron2._C``), keep it.
* Otherwise install the only Detectron2 the package registries hold: the
  Python sources of Detectron2 v0.6 from the ``pb1-detectron2`` source
  distribution. Its C++/CUDA sources are missing, so ``pip install
  pb1-detectron2`` fails while compiling; this script instead builds a
  pure-Python wheel named ``detectron2`` (version 0.6, model-zoo configs
  included) and installs it with pip, so that ``pip uninstall detectron2``
  removes it like any other distribution.

Nothing is fetched from outside the package index that pip is configured with
(``PIP_INDEX_URL``, default PyPI); the download is checked against a pinned
SHA-256. Run with the interpreter of the target environment:

    .venv/bin/python tools/install_detectron2.py [--force]
"""

import argparse
import hashlib
import html.parser
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import urllib.parse
import urllib.request

SDIST_PROJECT = "pb1-detectron2"
SDIST_FILE = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHEEL_VERSION = "0.6"

# Detectron2 0.6's own pure-Python requirements, less the pins that cannot be
# met any more (black==21.4b2 only formats LazyConfig dumps) and less the
# compiled ones this project already pins in requirements.txt.
WHEEL_REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.11",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def detectron2_importable():
    """True if some Detectron2 can be imported here (compiled or not)."""
    if importlib.util.find_spec("detectron2") is None:
        return False
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import detectron2, detectron2.config; print(detectron2.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:
        log(f"found an importable Detectron2 {proc.stdout.strip()}: keeping it")
        return True
    log("a 'detectron2' package is present but does not import:\n" + proc.stderr[-2000:])
    return False


class _LinkParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def _index_urls():
    urls = []
    if os.environ.get("PIP_INDEX_URL"):
        urls.append(os.environ["PIP_INDEX_URL"])
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if out:
        urls.append(out)
    urls.append("https://pypi.org/simple")
    return list(dict.fromkeys(u.rstrip("/") for u in urls))


def download_sdist(dest_dir):
    """Download the pinned sdist from the package index; return its path."""
    errors = []
    for index in _index_urls():
        page_url = f"{index}/{SDIST_PROJECT}/"
        try:
            with urllib.request.urlopen(page_url, timeout=60) as r:
                parser = _LinkParser()
                parser.feed(r.read().decode("utf-8", "replace"))
        except Exception as e:  # try the next index
            errors.append(f"{page_url}: {e}")
            continue
        for href in parser.links:
            url = urllib.parse.urljoin(page_url, href)
            if urllib.parse.urlparse(url).path.endswith("/" + SDIST_FILE):
                path = os.path.join(dest_dir, SDIST_FILE)
                log(f"downloading {url.split('#')[0]}")
                with urllib.request.urlopen(url, timeout=300) as r, open(path, "wb") as f:
                    shutil.copyfileobj(r, f)
                digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
                if digest != SDIST_SHA256:
                    raise SystemExit(
                        f"{SDIST_FILE}: SHA-256 {digest} does not match the pinned {SDIST_SHA256}; "
                        "refusing to install it."
                    )
                return path
        errors.append(f"{page_url}: no link to {SDIST_FILE}")
    raise SystemExit(
        f"Could not download {SDIST_FILE} from any package index:\n  "
        + "\n  ".join(errors)
        + "\nCheck your network / PIP_INDEX_URL, or install Detectron2 yourself "
        "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html) and run this again."
    )


def build_wheel(sdist, work_dir):
    """Repackage the sdist's ``detectron2/`` Python package as a wheel; return its path."""
    with tarfile.open(sdist) as tar:
        tar.extractall(work_dir, filter="data")
    src_root = os.path.join(work_dir, SDIST_FILE[: -len(".tar.gz")])
    pkg_root = os.path.join(work_dir, "pkg")
    os.makedirs(pkg_root)
    shutil.copytree(
        os.path.join(src_root, "detectron2"),
        os.path.join(pkg_root, "detectron2"),
        ignore=shutil.ignore_patterns("__pycache__", "csrc"),
    )
    shutil.copy(os.path.join(src_root, "LICENSE"), pkg_root)
    with open(os.path.join(pkg_root, "setup.py"), "w") as f:
        f.write(
            textwrap.dedent(
                f"""
                from setuptools import find_packages, setup
                setup(
                    name="detectron2",
                    version="{WHEEL_VERSION}",
                    description=(
                        "Detectron2 v0.6 Python sources (from pb1-detectron2), "
                        "without compiled ops"
                    ),
                    url="https://github.com/facebookresearch/detectron2",
                    license="Apache-2.0",
                    packages=find_packages(include=["detectron2", "detectron2.*"]),
                    package_data={{
                        "detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]
                    }},
                    include_package_data=False,
                    python_requires=">=3.7",
                    install_requires={WHEEL_REQUIRES!r},
                )
                """
            )
        )
    wheel_dir = os.path.join(work_dir, "wheels")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            wheel_dir,
            pkg_root,
        ],
        check=True,
    )
    (wheel,) = [os.path.join(wheel_dir, w) for w in os.listdir(wheel_dir) if w.endswith(".whl")]
    return wheel


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild and reinstall even if Detectron2 imports"
    )
    args = parser.parse_args()
    if not args.force and detectron2_importable():
        return
    with tempfile.TemporaryDirectory(prefix="d2wheel-") as tmp:
        sdist = download_sdist(tmp)
        wheel = build_wheel(sdist, tmp)
        log(f"installing {os.path.basename(wheel)}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel],
            check=True,
        )
    if not detectron2_importable():
        raise SystemExit("Detectron2 was installed but does not import; see the error above.")


if __name__ == "__main__":
    main()
