# make demo | make test | make bench — each sets up .venv first if needed (and only then).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Free disk (GB) a new .venv needs: PyTorch's x86_64 wheels bring ~4 GB of CUDA libraries (6.5 GB in all); checked
# first, so a full disk is named instead of failing midway through pip.
SETUP_GB ?= 8
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo eval-demo test test-all bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py
	@test -x $(PY) || { free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); [ "$$free" -ge $(SETUP_GB) ] || \
		{ echo "make: a new .venv needs about $(SETUP_GB) GB of free disk, $$free GB free here (SETUP_GB=N to override)" >&2; \
		exit 1; }; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spatext.demo --out demo_output

# Score the demo: a benchmark set from the demo shards, the real images and three training-free baselines on a tiny
# random SD-like base model, then a report (random weights everywhere: it exercises the code, not the methods).
EVAL := demo_output/eval
SCORE_FLAGS := --clip-model ViT-B-32 --clip-pretrained none --fid-extractor clip --segmenter mask2former \
	--segmenter-weights none --segmenter-config mask2former-tiny --segmenter-threshold 0 \
	--segmenter-mask-threshold 0 --segmenter-overlap-threshold 0
eval-demo: $(STAMP)
	test -f demo_output/build/manifest.json || $(MAKE) demo
	$(VENV)/bin/spatext eval make-benchmark --shards demo_output/build --protocol few --num 8 --seed 0 \
		--out $(EVAL)/bench --overwrite
	$(VENV)/bin/spatext tiny-base-model $(EVAL)/tiny-sd
	$(VENV)/bin/spatext eval generate --benchmark $(EVAL)/bench --method reference --out $(EVAL)/gen/reference --overwrite
	for m in global-only concat ntlb; do \
		$(VENV)/bin/spatext eval generate --benchmark $(EVAL)/bench --method $$m --base-model $(EVAL)/tiny-sd \
			--steps 10 --out $(EVAL)/gen/$$m --overwrite || exit 1; done
	$(VENV)/bin/spatext eval score --benchmark $(EVAL)/bench --generations $(EVAL)/gen/reference \
		$(EVAL)/gen/global-only $(EVAL)/gen/concat $(EVAL)/gen/ntlb --out $(EVAL)/report $(SCORE_FLAGS)
	@echo "report: $(EVAL)/report/report.md"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/pipeline_cpu.py --repeats 1 --out bench_output
	$(PY) benchmarks/pipeline_cpu.py --num-samples 512 --clip-model spatext-tiny-224 --repeats 6 --out bench_output/tiny224
	$(PY) benchmarks/loader.py --num-samples 256 --modes uint8 --repeats 5 --out bench_output
	$(PY) benchmarks/shared_model.py --repeats 5 --out bench_output
	$(PY) benchmarks/pipeline_overlap.py --num-samples 512 --ms-per-image 10 \
		--modes in_process,processes:3,threads:4 --out bench_output/overlap
	$(PY) benchmarks/torch_threads.py --repeats 3 --out bench_output

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf demo_output bench_output .pytest_cache
