# nanoSFT: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch (small, fast to install). On a GPU machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev install-bench demo test test-fast test-all bench bench-prepare bench-train clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

install-bench: $(VENV)/.installed-dev requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt

demo: $(VENV)/.installed
	@echo "make demo: the end-to-end demo is not written yet (see issue 6)."; exit 1

# The whole suite, slow tests included, stays under 10 minutes on a 2-core CPU.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# Benchmarks: this project and its peers (transformers, TRL) in the same run; see benchmarks/RESULTS.md.
bench: bench-prepare bench-train

bench-prepare: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_prepare.py

bench-train: install-bench
	$(PY) benchmarks/bench_train.py --ablations

clean:
	rm -rf $(VENV) .pytest_cache out-demo data/demo
