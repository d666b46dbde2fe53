# make demo | make test | make bench — each sets up .venv first if needed (and only then).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spatext.demo --out demo_output

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/pipeline_cpu.py --out bench_output

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf demo_output bench_output .pytest_cache
