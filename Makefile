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

.PHONY: install demo test lint clean-demo help

help:
	@echo "make demo   - install, then run the main job end to end (shards -> DALI -> Ray Train -> MLflow -> multi-crop eval)"
	@echo "make test   - install, then run the test suite (RUN_SLOW=1 and REAL_DATA_DIR=... enable the slow/real-data tests)"
	@echo "make lint   - ruff"

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
