#!/usr/bin/env bash
# Run gfocalv2's test suite against an official Detectron2 built from a source tree.
#
#   tools/test_with_detectron2_source.sh SOURCE_DIR [PYTEST_ARGS...]
#
# SOURCE_DIR is a Detectron2 source tree (a git checkout of
# facebookresearch/detectron2 at any tag or commit: its setup.py and detectron2/
# package), kept outside this repository. The script
#   1. creates a virtual environment of its own (default .venv-d2src/<name>; set
#      D2SRC_VENV to choose another), separate from the .venv of `make test`;
#   2. installs current pip/wheel/setuptools (as a new user gets them: setuptools
#      >= 81 has no pkg_resources), then this project's requirements.txt;
#   3. builds Detectron2 from SOURCE_DIR the way its install guide says, with
#      --no-build-isolation (its setup.py imports torch). Without CUDA this is a CPU
#      build: detectron2._C holds the CPU ops. MAX_JOBS limits the compile jobs;
#   4. installs this package with `pip install -e '.[test]'` and checks that the
#      compiled detectron2._C and gfocalv2 import (the README's section "Installing
#      on your own GPU machine", step by step, with requirements.txt's torch);
#   5. runs `python -m pytest -q -m "not slow" tests` plus PYTEST_ARGS in it.
# Steps 1-4 are skipped on a second run with the same SOURCE_DIR and unchanged
# requirements (REBUILD=1 forces them). `make test` itself is unaffected: it
# stays on the registry-only install in .venv.
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "${1:-2}"
}
[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac

repo=$(cd "$(dirname "$0")/.." && pwd)
src=$1
shift
if [ ! -f "$src/setup.py" ] || [ ! -f "$src/detectron2/__init__.py" ]; then
    echo "error: $src is not a Detectron2 source tree (expected $src/setup.py and $src/detectron2/__init__.py)." >&2
    echo "Give the directory of a checkout of https://github.com/facebookresearch/detectron2" >&2
    exit 2
fi
src=$(cd "$src" && pwd)
case "$src/" in
    "$repo"/*) echo "error: keep the Detectron2 sources outside this repository ($src is inside $repo)." >&2; exit 2 ;;
esac

python=${PYTHON:-python3}
name=$(basename "$src")
venv=${D2SRC_VENV:-$repo/.venv-d2src/$name}
stamp=$venv/.gfocalv2-d2src
want="source=$src
inputs=$(cat "$repo/requirements.txt" "$repo/setup.py" | sha256sum | cut -d' ' -f1)"
py=$venv/bin/python
say() { printf '[test_with_detectron2_source] %s\n' "$*"; }

if [ "${REBUILD:-0}" != 1 ] && [ -x "$py" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "reusing $venv (built from $src; REBUILD=1 rebuilds it)"
else
    rm -f "$stamp"
    say "creating $venv"
    [ -x "$py" ] || "$python" -m venv "$venv"
    "$py" -m pip install -q --upgrade pip wheel setuptools
    say "installing requirements.txt (torch, torchvision, ...)"
    "$py" -m pip install -q -r "$repo/requirements.txt"
    say "building Detectron2 from $src (MAX_JOBS=${MAX_JOBS:-$(nproc)}; a few minutes)"
    start=$(date +%s)
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install -q --no-build-isolation "$src"
    say "built in $(( $(date +%s) - start )) s"
    "$py" -m pip install -q -e "$repo[test]"
    echo "$want" > "$stamp"
fi

# Run from the repository, but make sure the installed Detectron2 is the one from SOURCE_DIR.
cd "$repo"
"$py" - "$src" <<'PY'
import os, sys
import detectron2, detectron2._C  # the compiled extension must exist
from gfocalv2.compat import COMPAT_STATE, apply
apply()
src = sys.argv[1]
print(f"[test_with_detectron2_source] detectron2 {detectron2.__version__} from {os.path.dirname(detectron2.__file__)}"
      f" (compiled ops: {detectron2._C.__file__}); built from {src}")
print(f"[test_with_detectron2_source] gfocalv2.compat fixes applied: {COMPAT_STATE['patches'] or 'none'}")
PY
exec "$py" -m pytest -q -m "not slow" tests "$@"
