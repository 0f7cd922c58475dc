# One-command set-up: `make demo` (the main job end to end) and `make test` (the test suite).
# Both create .venv and install the pinned stack on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so that nothing afterwards pulls a CUDA build onto a CPU
# machine. On a GPU machine, install your CUDA torch into the venv first (it is then kept); on a
# CPU machine without a local CPU wheel, use TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=
GPU_CHECK_ARGS ?=
REAL_DATA_DIR ?= ../shared/data
# gpu-check runs where it is started: the venv's python when there is one, else the machine's own
# (a GPU image with CUDA torch and DALI carried in; nothing is installed there).
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: install demo test lint clean-demo help gpu-check gpu-check-data

help:
	@echo "make demo   - install, then run the main job end to end (shards -> DALI -> Ray Train -> MLflow -> multi-crop eval)"
	@echo "make test   - install, then run the test suite (RUN_SLOW=1 and REAL_DATA_DIR=... enable the slow/real-data tests)"
	@echo "make lint   - ruff"
	@echo "make gpu-check       - on a GPU machine: tests, loader, training step, peers, end to end, multi-crop (GPU_CHECK_ARGS=--smoke on CPU)"
	@echo "make gpu-check-data  - the real-JPEG shards gpu-check reads (.gpucheck/shards, from REAL_DATA_DIR)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --disable-pip-version-check -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu-only')"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m orchestration.demo $(DEMO_ARGS)

# pytest exits 5 when it collected no test: that is not a failure of the suite.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: install
	$(BIN)/ruff check .

# No install step: on a GPU machine the image's CUDA torch is used as it is.
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

gpu-check-data: install
	$(BIN)/python -m benchmarks.gpu_check --prepare $(REAL_DATA_DIR)/imagenet-sample-images.tar
