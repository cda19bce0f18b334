# Two commands set everything up on a fresh machine:
#   make demo   install into .venv if needed, then train + evaluate GFocalV2 on the embedded dataset
#   make test   install into .venv if needed, then run the test suite
# Both reuse .venv on a second run: the install step is a no-op while its inputs are unchanged.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gfocalv2-installed
PYTEST_ARGS ?=

RUFF_VERSION := 0.17.5

.PHONY: install demo test test-slow lint format clean-venv analyze dgqp-study

install: $(STAMP)

# A fresh .venv takes about 6.5 GiB (torchvision needs the CUDA build of torch) and pip unpacks
# in the temporary folder: say so before pip fails half way with "No space left on device".
INSTALL_GIB := 10
DISK_CHECK := import shutil, sys, tempfile; \
  free = {d: shutil.disk_usage(d).free / 2**30 for d in ('.', tempfile.gettempdir())}; \
  low = ', '.join(f'{f:.1f} GiB free in {d}' for d, f in free.items() if f < $(INSTALL_GIB)); \
  low and sys.exit(f'error: installing into $(VENV) needs about $(INSTALL_GIB) GiB of disk, ' \
  f'only {low}. Free some space (or point TMPDIR elsewhere) and run make again.')

$(STAMP): requirements.txt setup.py tools/install_detectron2.py
	@test -x $(PY) || $(PYTHON) -c "$(DISK_CHECK)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "from gfocalv2 import compat; compat.apply(); import gfocalv2.engine, detectron2.evaluation; print('gfocalv2 environment ready')"
	@touch $@

demo: install
	$(PY) projects/DigitScenes/train_digits.py

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

# GFL (V1) and GFocalV2 side by side (docs/analysis.md): trains both on DigitScenes (about 8 min
# each on 2 CPU cores; a model whose model_final.pth and results json already exist is not trained
# again), then writes the quality-IoU correlation, AP and plots to output/analysis.
DIGITS_DATA := $(or $(DETECTRON2_DATASETS),datasets)/digit_scenes
ANALYZE_RUNS := output/digit_scenes_analyze
ANALYZE_RESULTS := inference/coco_instances_results.json

analyze: install
	@if [ -f $(ANALYZE_RUNS)/gfocalv2/model_final.pth ] && \
	    [ -f $(ANALYZE_RUNS)/gfocalv2/$(ANALYZE_RESULTS) ]; then \
	  echo "GFocalV2 already trained: $(ANALYZE_RUNS)/gfocalv2"; else \
	  $(PY) projects/DigitScenes/train_digits.py --num-vis 0 OUTPUT_DIR $(ANALYZE_RUNS)/gfocalv2; fi
	@if [ -f $(ANALYZE_RUNS)/gfl/model_final.pth ] && \
	    [ -f $(ANALYZE_RUNS)/gfl/$(ANALYZE_RESULTS) ]; then \
	  echo "GFL (V1) already trained: $(ANALYZE_RUNS)/gfl"; else \
	  $(PY) projects/DigitScenes/train_digits.py --gfl-v1 --num-vis 0 \
	    OUTPUT_DIR $(ANALYZE_RUNS)/gfl; fi
	$(PY) -m gfocalv2.analyze --dataset digit_scenes_val \
	  --register-coco digit_scenes_val $(DIGITS_DATA)/val.json $(DIGITS_DATA)/val \
	  --results $(ANALYZE_RUNS)/gfocalv2/$(ANALYZE_RESULTS) $(ANALYZE_RUNS)/gfl/$(ANALYZE_RESULTS) \
	  --labels GFLV2 GFLV1 --output output/analysis

# Does the DGQP help? GFocalV2 against GFL (V1), 5 seeds each, on DigitScenes and its crowded
# variant, paired by seed (docs/analysis.md): 20 trainings, about 100 min on 2 CPU cores (two at
# a time); finished runs are reused. Then the checkpoints along training, and GFocalV2 without
# its quality factor. Writes output/dgqp_study/report.md. DGQP_STUDY_ARGS adds options and
# KEY VALUE overrides.
DGQP_STUDY_ARGS ?=

dgqp-study: install
	$(PY) tools/dgqp_study.py --curve --quality-check --output output/dgqp_study $(DGQP_STUDY_ARGS)

# Lint and formatting (ruff, settings in pyproject.toml); `make format` rewrites the files.
lint: install
	@$(PY) -m ruff --version 2>/dev/null | grep -q "$(RUFF_VERSION)" || $(PY) -m pip install -q ruff==$(RUFF_VERSION)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	@$(PY) -m ruff --version 2>/dev/null | grep -q "$(RUFF_VERSION)" || $(PY) -m pip install -q ruff==$(RUFF_VERSION)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean-venv:
	rm -rf $(VENV)
