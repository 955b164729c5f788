# nanoSFT: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     ?= $(VENV)/bin/python
# torch==2.13.0: on this project's machines the small CPU build from local disk. On PyPI (Linux) it is
# the CUDA build; for the CPU build: make TORCH_INDEX=https://download.pytorch.org/whl/cpu ...
# On a GPU machine: make TORCH_SPEC='torch' ... An installed torch is kept.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install install-dev install-bench demo demo-lora test test-fast test-gpu test-all bench bench-prepare bench-train bench-lora clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

install-bench: $(VENV)/.installed-dev requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt

# The whole user flow on CPU: data -> shards -> base model -> fine-tune (with generation evals on the
# held-out set every 50 steps) -> evaluate -> plot.
# One intra-op thread: the demo model is tiny, and thread hand-off costs more than its matmuls.
# tests/test_demo_pipeline.py runs this very recipe in miniature through the DEMO_* knobs.
DEMO_ENV        := OMP_NUM_THREADS=1
DEMO_DATA       ?= data/demo
DEMO_OUT        ?= out-demo
DEMO_DATA_ARGS  ?=
DEMO_TRAIN_ARGS ?=
DEMO_PROMPT     ?= What is 3 + 4?
demo: $(VENV)/.installed-dev
	rm -rf $(DEMO_OUT)  # a fresh run: no stale checkpoints or run logs from a previous demo
	$(PY) data/make_demo_data.py --out_dir $(DEMO_DATA) $(DEMO_DATA_ARGS)
	$(PY) prepare_sft.py --input $(DEMO_DATA)/train.jsonl --tokenizer $(DEMO_DATA)/tokenizer \
		--out_dir $(DEMO_DATA)/sft --max_length 256 --show 2
	@echo; echo "== the base model (random init, 0 steps) =="
	$(DEMO_ENV) $(PY) train_sft.py configs/sft_demo_cpu.py --data_dir=$(DEMO_DATA)/sft $(DEMO_TRAIN_ARGS) \
		--gen_eval_data=$(DEMO_DATA)/test.jsonl --max_iters=0 --out_dir=$(DEMO_OUT)/base
	$(DEMO_ENV) $(PY) sample_sft.py $(DEMO_OUT)/base/ckpt.pt --temperature 0 --max_new_tokens 16 --prompt "$(DEMO_PROMPT)"
	@echo; echo "== supervised fine-tuning =="
	$(DEMO_ENV) $(PY) train_sft.py configs/sft_demo_cpu.py --data_dir=$(DEMO_DATA)/sft $(DEMO_TRAIN_ARGS) \
		--gen_eval_data=$(DEMO_DATA)/test.jsonl --out_dir=$(DEMO_OUT)
	$(DEMO_ENV) $(PY) sample_sft.py $(DEMO_OUT)/ckpt.pt --temperature 0 --max_new_tokens 16 --prompt "$(DEMO_PROMPT)"
	@echo; echo "== held-out evaluation: base vs fine-tuned =="
	$(DEMO_ENV) $(PY) eval_sft.py $(DEMO_DATA)/test.jsonl $(DEMO_OUT)/base/ckpt.pt $(DEMO_OUT)/ckpt.pt \
		--labels base sft --max_new_tokens 32 --batch_size 32 --show 3 --out $(DEMO_OUT)/eval.json
	$(PY) plot_run.py $(DEMO_OUT)/run_*.json --out $(DEMO_OUT)/loss.png
	@echo; echo "demo outputs: $(DEMO_DATA)/ (conversations, tokenizer, shards), $(DEMO_OUT)/ckpt.pt (fine-tuned),"
	@echo "  $(DEMO_OUT)/eval.json (the table above), $(DEMO_OUT)/loss.png (loss, held-out accuracy and LR curves)."
	@echo "  chat with it: $(PY) sample_sft.py $(DEMO_OUT)/ckpt.pt"

# LoRA and QLoRA on the demo (configs/lora_demo_cpu.py): a base (30 full steps), then 370 steps of full
# fine-tuning, LoRA and QLoRA from it, and one table of the four on the held-out set.
LORA_OUT ?= out-demo-lora
demo-lora: $(VENV)/.installed-dev
	rm -rf $(LORA_OUT)
	$(PY) data/make_demo_data.py --out_dir $(DEMO_DATA) $(DEMO_DATA_ARGS)
	$(PY) prepare_sft.py --input $(DEMO_DATA)/train.jsonl --tokenizer $(DEMO_DATA)/tokenizer \
		--out_dir $(DEMO_DATA)/sft --max_length 256
	@echo; echo "== the base: 30 steps of full fine-tuning =="
	$(DEMO_ENV) $(PY) train_sft.py configs/sft_demo_cpu.py --data_dir=$(DEMO_DATA)/sft --max_iters=30 \
		--lr_decay_iters=30 --warmup_iters=10 --eval_interval=30 --out_dir=$(LORA_OUT)/base
	@echo; echo "== 370 more steps: full fine-tuning, LoRA, QLoRA =="
	$(DEMO_ENV) $(PY) train_sft.py configs/sft_demo_cpu.py --data_dir=$(DEMO_DATA)/sft --max_iters=370 \
		--lr_decay_iters=370 --init_from=$(LORA_OUT)/base/ckpt.pt --out_dir=$(LORA_OUT)/full
	$(DEMO_ENV) $(PY) train_sft.py configs/sft_demo_cpu.py configs/lora_demo_cpu.py --data_dir=$(DEMO_DATA)/sft \
		--init_from=$(LORA_OUT)/base/ckpt.pt --out_dir=$(LORA_OUT)/lora
	$(DEMO_ENV) $(PY) train_sft.py configs/sft_demo_cpu.py configs/lora_demo_cpu.py --data_dir=$(DEMO_DATA)/sft \
		--init_from=$(LORA_OUT)/base/ckpt.pt --out_dir=$(LORA_OUT)/qlora --finetune=qlora
	@echo; echo "== held-out evaluation =="
	$(DEMO_ENV) $(PY) eval_sft.py $(DEMO_DATA)/test.jsonl $(LORA_OUT)/base/ckpt.pt $(LORA_OUT)/full/ckpt.pt \
		$(LORA_OUT)/lora/ckpt.pt $(LORA_OUT)/qlora/ckpt.pt --labels base full lora qlora \
		--max_new_tokens 32 --batch_size 32 --out $(LORA_OUT)/eval.json
	@echo "  export: $(PY) export_hf.py $(LORA_OUT)/lora/ckpt.pt DIR [--peft]"

# The whole suite, slow tests included, stays under 10 minutes on a 2-core CPU.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not slow"

# On a CUDA machine (install a CUDA torch first, e.g. make TORCH_SPEC=torch test-gpu): the GPU-only tests.
test-gpu: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m gpu

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# Benchmarks: this project and its peers (transformers, TRL) in the same run; see benchmarks/RESULTS.md.
bench: bench-prepare bench-train

bench-prepare: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_prepare.py

bench-lora: install-bench
	$(PY) benchmarks/bench_lora.py   # ~45 min on 2 cores: not part of `make bench`

bench-train: install-bench
	$(PY) benchmarks/bench_train.py --ablations

clean:
	rm -rf $(VENV) .pytest_cache out-demo out-demo-lora data/demo
