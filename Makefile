# Fresh-machine entry points: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
# `make demo` installs the runtime lock only; `make test` adds dev tools and Ray (STAMP: everything installed).
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed
# The CPU build of torch lies here; the locks pin it (requirements/torch.txt).
FIND_LINKS := /opt/wheels
UV_INSTALL := $(UV) pip install -q --python $(BIN)/python --find-links $(FIND_LINKS)
# Label Studio runs from its own virtualenv: it pins Django, DRF, redis... (tests, bench, local trials)
LS_VENV := .venv-labelstudio
LS := $(LS_VENV)/bin/label-studio

.PHONY: venv runtime labelstudio demo test lint floor lock bench train-demo clean

# uv itself, pinned with its hashes; it installs the locks (hash-checked) much faster than pip. pip only
# bootstraps uv and is then removed (17 MB of the runtime venv); a rerun of `python -m venv` brings it back.
$(UV): requirements/uv.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements/uv.txt
	$(UV) pip uninstall -q --python $(BIN)/python pip

$(RUNTIME): requirements/runtime.txt | $(UV)
	$(UV_INSTALL) --require-hashes -r requirements/runtime.txt
	$(UV_INSTALL) --no-deps -e .
	touch $(RUNTIME)

$(STAMP): requirements/test.txt | $(RUNTIME)
	$(UV_INSTALL) --require-hashes -r requirements/test.txt
	touch $(STAMP)

runtime: $(RUNTIME)

venv: $(STAMP)

$(LS):
	$(PY) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q label-studio==1.23.2

labelstudio: $(LS)

demo: $(RUNTIME)
	$(BIN)/xdlabel demo

test: lint floor $(LS)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The bundled model, seeded, in five stages (see README for the time each took here); writes
# xdlabel/models/shapes.{safetensors,json}. Rerunning it resumes where it stopped (runs/bundled*).
# Stage 2 starts from stage 1 with new scenes (seed 1), batch 8, near-miss negative captions for
# retrieval and a heavier no-object weight for the unmatched queries. Stage 3 moves to the demo
# corpus's size and keeps the class names apart; stage 4 weighs retrieval up, with more near misses.
# Stage 5 draws each step at another width, or portrait, so that inputs padded to a multiple of 32
# (photos of other aspects) are in its training. The bundle scores text -> image on the decoder embedding
# alone, the weight chosen on validation draws (bench/retrieval_weight.py).
train-demo: $(STAMP)
	$(BIN)/xdlabel train --config parity --out runs/bundled --steps 4800 --batch-size 4 --lr 3e-4 \
		--width 96 --height 64 --checkpoint-every 200
	$(BIN)/xdlabel train --config parity --init runs/bundled/model.safetensors --out runs/bundled-stage2 \
		--steps 3600 --batch-size 8 --lr 2e-4 --seed 1 --width 96 --height 64 --checkpoint-every 200 \
		--no-object-weight 0.4 --near-misses 4
	$(BIN)/xdlabel train --config parity --init runs/bundled-stage2/model.safetensors --out runs/bundled-stage3 \
		--steps 3600 --batch-size 4 --lr 2e-4 --seed 2 --width 192 --height 128 --checkpoint-every 200 \
		--no-object-weight 0.4 --near-misses 4 --name-separation 1
	$(BIN)/xdlabel train --config parity --init runs/bundled-stage3/model.safetensors --out runs/bundled-stage4 \
		--steps 2400 --batch-size 4 --lr 1e-4 --seed 3 --width 192 --height 128 --checkpoint-every 200 \
		--no-object-weight 0.4 --near-misses 8 --retrieval-weight 6 --name-separation 1
	$(BIN)/xdlabel train --config parity --init runs/bundled-stage4/model.safetensors --out runs/bundled-stage5 \
		--steps 1600 --batch-size 4 --lr 1e-4 --seed 4 --width 240 --min-width 128 --portrait 0.2 --height 128 \
		--checkpoint-every 200 --no-object-weight 0.4 --near-misses 8 --retrieval-weight 6 --name-separation 1
	$(BIN)/xdlabel model bundle runs/bundled-stage5 --width 192 --height 128 --retrieval-decoder-weight 1.0

# The declared minimums of the direct dependencies, installed in .venv-floor and run (tokenizer, model parity).
floor: $(STAMP)
	$(BIN)/python requirements/floor.py

# Regenerate requirements/*.txt from pyproject.toml (needs the package index).
lock: $(STAMP)
	$(BIN)/python requirements/lock.py

bench: $(STAMP)
	$(BIN)/python bench/model.py

# On a CUDA machine (needs torch with CUDA, numpy, pillow; see bench/gpu_check.py): one table, <= 8 minutes.
.PHONY: gpu-check
gpu-check:
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) $(LS_VENV) .venv-floor xdlabel-data runs
