# Fresh-machine entry points: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Label Studio runs from its own virtualenv: it pins Django, DRF, redis... (tests, bench, local trials)
LS_VENV := .venv-labelstudio
LS := $(LS_VENV)/bin/label-studio

.PHONY: venv labelstudio demo test lint bench train-demo clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so that the `torch>=2.1` requirement installs nothing more.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(STAMP)

venv: $(STAMP)

$(LS):
	$(PY) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q label-studio==1.23.2

labelstudio: $(LS)

demo: $(STAMP)
	$(BIN)/xdlabel demo

test: lint $(LS)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The bundled model: ~30 min on a 2-core CPU, seeded; writes xdlabel/models/shapes.{safetensors,json}.
# Rerunning it resumes the run in runs/bundled.
train-demo: $(STAMP)
	$(BIN)/xdlabel train --config parity --out runs/bundled --steps 4800 --batch-size 4 --lr 3e-4 \
		--width 96 --height 64 --checkpoint-every 200
	$(BIN)/xdlabel model bundle runs/bundled --width 96 --height 64

bench: $(STAMP)
	$(BIN)/python bench/model.py

clean:
	rm -rf $(VENV) $(LS_VENV) xdlabel-data runs
