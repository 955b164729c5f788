"""
Supervised fine-tuning, nanoGPT style: TrainConfig below holds the defaults, a python config file and
`--key=value` overrides change them (configurator.py). One process, or torchrun with DDP or FSDP:

    python train_sft.py configs/sft_demo_cpu.py
    torchrun --standalone --nproc_per_node=8 train_sft.py configs/sft_qwen3_1.8b.py
    python train_sft.py configs/sft_demo_cpu.py --help     # every key, its value and what it does

What this loop guarantees beyond the usual ones:
- every trained token weighs the same in a step, whatever the padding, accumulation or GPU count
  (loss = sum over trained tokens / trained tokens of the whole step, counted before backward);
- the examples an optimizer step sees depend only on (seed, step), not on how the global batch is
  split into ranks x micro-steps x rows;
- `init_from='resume'` continues bit-exactly (CPU) where ckpt.pt left off: model, optimizer, RNG
  states of every rank and the data cursor are in the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

from configurator import ConfigError, configure, help_text
from model_config import ATTENTION_CHOICES, PRESET_ALIASES, PRESETS
from progress import Progress, say


@dataclass(frozen=True)
class TrainConfig:
    # I/O
    out_dir: str = 'out-sft'
    eval_interval: int = 200          # evaluate, then save ckpt_XXXXXX.pt, every this many steps
    log_interval: int = 1             # a log line every this many steps
    eval_iters: int = 20              # batch_size rows x this per split in each evaluation (the same
                                      # rows on any number of GPUs, split among them)
    eval_only: bool = False           # evaluate the starting model once and exit
    best_metric: str = 'val_loss'     # what ckpt_best.pt and early stopping follow: 'val_loss' |
                                      # 'accuracy' | 'format' (the generation evals' metrics)
    early_stopping_patience: int = 0  # stop after this many evaluations without a new best
                                      # best_metric (0 = never)
    keep_last_n: int = 0              # keep only the newest n ckpt_XXXXXX.pt (0 = keep all)
    checkpoint_format: str = 'auto'   # 'file' (one torch.save file, gathered on rank 0) | 'sharded' (a
                                      # directory, each rank writes its shard: torch.distributed.
                                      # checkpoint) | 'auto' (sharded under parallel='fsdp', else file;
                                      # LoRA checkpoints are always one file)
    init_from: str = 'scratch'        # 'scratch' | 'resume' | path/to/ckpt.pt | 'hf:/local/hf/dir'
    # generation evals: greedy replies scored for format and exact match (gen_eval.py, as eval_sft.py)
    gen_eval_data: str = ''           # held-out JSONL with `reference`s (or GSM8K); '' = off
    gen_eval_interval: int = 0        # every this many steps (0 = every eval_interval)
    gen_eval_limit: int = 0           # the first N conversations only (0 = all)
    gen_eval_max_new_tokens: int = 0  # reply limit (0 = the longest held-out reply + 16 tokens, at
                                      # most half the block, as eval_sft.py); cut-off replies are wrong
    gen_eval_batch_size: int = 64     # prompts per batched generate call, per process
    # wandb
    wandb_log: bool = False           # also log to Weights & Biases (if installed)
    wandb_project: str = 'nanosft'
    wandb_run_name: str | None = None
    # data
    data_dir: str = 'data/my_sft'     # prepare_sft.py output dir, or a .jsonl file tokenized on the fly
    tokenizer: str = 'auto'           # .jsonl data only: 'qwen3', a local HF tokenizer dir, or 'auto'
                                      # (init_from='hf:DIR': DIR's own if it has tokenizer.json)
    train_on: str = 'all'             # .jsonl data only: 'all' assistant turns or the 'last' one
    chat_template: str = 'auto'       # .jsonl data only: auto | chatml | qwen3 | qwen2.5 | llama3 |
                                      # mistral | hf (chat_format.py; auto: from the tokenizer)
    mixture_by: str = ''              # weighted sources (prepare_sft.py --input a:0.7 b:0.3): the
                                      # weights are shares of 'examples' | 'tokens' (trained); '' =
                                      # as prepared (meta.json mixture_by)
    gradient_accumulation_steps: int = 4   # micro-steps per optimizer step, per process
    batch_size: int = 4               # rows per micro-step per process
    block_size: int = 2048            # longest row in tokens (longer examples are truncated, counted)
    packing: bool = False             # False: pad to the longest row of the micro-batch; True: pack
    seed: int = 1337
    verify_data: bool = True          # check the shard files against meta.json's sha256 digests
                                      # before training (~1 s per GB; False skips it for huge sets)
    # model (init_from='scratch': a preset and/or explicit architecture keys)
    model_preset: str = 'tiny'        # a model_config.PRESETS name
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    n_embd: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    dropout: float = 0.0              # overrides the checkpoint's / HF model's dropout
    # fine-tuning method: 'full' trains every weight; 'lora' freezes the base and trains low-rank
    # adapters (lora.py); 'qlora' also stores the frozen projections in 4-bit NF4 (needs torchao)
    finetune: str = 'full'
    lora_rank: int = 16
    lora_alpha: float = 32.0          # adapter scale = lora_alpha / lora_rank (/ sqrt(rank): rslora)
    lora_dropout: float = 0.0         # dropout on the adapters' input
    lora_targets: str = 'all'         # comma list of HF projection names (q_proj,k_proj,v_proj,o_proj,
                                      # gate_proj,up_proj,down_proj; GPT-2: c_attn,c_proj,c_fc) or
                                      # 'all'; + 'embed_tokens' / 'lm_head' to train those in full
    lora_rslora: bool = False         # rank-stabilized scale alpha / sqrt(rank)
    lora_dora: bool = False           # DoRA: a trained magnitude per output row
    lora_base_dtype: str = 'auto'     # the frozen projections' dtype: 'bfloat16' halves the base (fp32
                                      # math on it without autocast); 'auto': bfloat16 under bf16
                                      # autocast (bit-identical there), else float32 | 'float32'
    lora_quantize_embeddings: bool = False  # qlora: the frozen embedding and LM head in NF4 too (off as in
                                      # QLoRA / PEFT: the logits then come from 4-bit weights)
    lora_base: str = ''               # the base ('hf:/dir' or ckpt.pt) when init_from is a PEFT adapter
                                      # directory, or where a LoRA checkpoint's base moved to
    # optimizer (AdamW; weight decay on matrices and embeddings only)
    learning_rate: float = 2e-5       # peak learning rate, after warmup
    max_iters: int = 3000             # optimizer steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # 0 disables clipping (the norm is still computed and logged)
    max_nan_steps: int = 10           # abort after this many non-finite steps in a row
    # learning rate schedule: linear warmup, cosine decay to min_lr at lr_decay_iters
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 3000        # usually = max_iters
    min_lr: float = 2e-6
    # system
    backend: str = ''                 # '' -> nccl on CUDA, gloo on CPU
    parallel: str = 'ddp'             # under torchrun: 'ddp' (replicated model) | 'fsdp' (FSDP2:
                                      # parameters, gradients and optimizer state sharded)
    device: str = ''                  # '' -> cuda if available, else cpu
    dtype: str = ''                   # '' -> bfloat16 on CUDA with bf16 support, float16 on other
                                      # CUDA, float32 on CPU; bfloat16 / float16 train under autocast
                                      # (weights and AdamW stay fp32) on CPU too: bf16 matmuls run ~3x
                                      # fp32's where the CPU has AVX512-BF16 or AMX
    compile: bool = False             # torch.compile the model
    attention: str = 'auto'           # packed rows: 'auto' (flash varlen on CUDA bf16/fp16, SDPA per
                                      # document elsewhere) | 'varlen' | 'per_doc' | 'dense' (the
                                      # O(T^2) mask: a reference); all compute the same (attention.py)
    activation_checkpointing: str = 'none'  # 'none' | 'full' (recompute every block in backward:
                                      # ~1/3 more compute, activations ~ one n_embd vector per token
                                      # per layer) | 'selective' (every k-th block, k below)
    activation_checkpointing_every: int = 2  # 'selective': checkpoint blocks 0, k, 2k, ...
    peak_flops: float = 0.0           # per GPU, for MFU; 0 -> guess from the device name

    def __post_init__(self):
        choices = {'parallel': ('ddp', 'fsdp'), 'train_on': ('all', 'last'), 'finetune': ('full', 'lora', 'qlora'),
                   'checkpoint_format': ('auto', 'file', 'sharded'),
                   'dtype': ('', 'float32', 'bfloat16', 'float16', 'fp32', 'bf16', 'fp16'),
                   'mixture_by': ('', 'examples', 'tokens'),
                   'best_metric': ('val_loss', 'accuracy', 'format'),
                   'attention': ATTENTION_CHOICES,
                   'activation_checkpointing': ('none', 'full', 'selective'),
                   'lora_base_dtype': ('auto', 'float32', 'bfloat16')}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}: expected one of {allowed}")
        for key in ('eval_interval', 'log_interval', 'gradient_accumulation_steps', 'batch_size',
                    'max_nan_steps', 'activation_checkpointing_every'):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.block_size < 2:
            raise ConfigError(f"block_size={self.block_size}: must be >= 2")
        if self.model_preset and PRESET_ALIASES.get(self.model_preset, self.model_preset) not in PRESETS:
            raise ConfigError(f"model_preset={self.model_preset!r}: expected one of "
                              f"{sorted(PRESETS) + sorted(PRESET_ALIASES)}")
        for key in ('learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'warmup_iters', 'lr_decay_iters'):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")
        for key in ('beta1', 'beta2'):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be in [0, 1)")
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr={self.min_lr:g} is above learning_rate={self.learning_rate:g}: the cosine "
                              f"schedule would raise the rate; set min_lr <= learning_rate (often a tenth)")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed={self.seed}: must be in [0, 2**32)")
        if self.eval_iters < 0 or self.max_iters < 0 or self.keep_last_n < 0:
            raise ConfigError("eval_iters, max_iters and keep_last_n must be >= 0")
        for key in ('gen_eval_interval', 'gen_eval_limit', 'early_stopping_patience'):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")
        if self.gen_eval_batch_size < 1 or not 0 <= self.gen_eval_max_new_tokens < self.block_size:
            raise ConfigError("gen_eval_batch_size must be >= 1 and gen_eval_max_new_tokens in "
                              f"[0, block_size={self.block_size})")
        if self.best_metric != 'val_loss':
            if not self.gen_eval_data:
                raise ConfigError(f"best_metric={self.best_metric!r} is a generation-eval metric: "
                                  "set gen_eval_data too")
            if self.eval_interval % (self.gen_eval_interval or self.eval_interval):
                raise ConfigError(f"best_metric={self.best_metric!r}: the generation evals must run at "
                                  f"every checkpoint, so eval_interval={self.eval_interval} must be a "
                                  f"multiple of gen_eval_interval={self.gen_eval_interval}")


USAGE = ('usage: [torchrun ...] train_sft.py [config.py ...] [--key=value ...] [--help]\n'
         '       train_sft.py [config.py ...] [--key=value ...] --plan [--gpus N] [--gpu_memory_gb G]'
         '   (memory per GPU of this run and its alternatives, nothing trained)')
if __name__ == '__main__' and {'-h', '--help'} & set(sys.argv[1:]):
    # --help answers here, before torch is imported (seconds on a cold start)
    try:
        print(help_text(TrainConfig, sys.argv[1:], USAGE))
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    raise SystemExit(0)

import random  # noqa: E402  (below: the heavy imports, after --help)
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from attention import describe as describe_attention  # noqa: E402
from chat_records import DataError  # noqa: E402
from checkpoint import (CheckpointError, base_source, check_device, is_sharded_checkpoint,  # noqa: E402
                        load_checkpoint, lora_model, materialize, open_sharded_checkpoint,
                        restore_training_state, save_training_state)
from lora import (LoRAConfig, LoRAError, apply_lora, base_fingerprint, check_qlora_device,  # noqa: E402
                  hold_embeddings_in, is_nf4, merge_lora, quantizer_version, read_peft_adapter,
                  resolve_base_dtype)
from gen_eval import HeldOut, load_held_out, sharded_eval  # noqa: E402
from model_builder import ConfigurableGPT, trained_positions  # noqa: E402
from sft_data import (DEFAULT_PAD_ID, IGNORE_INDEX, GlobalSampler, SFTDataset, ShardDataset,  # noqa: E402
                      check_token_ids, eval_batches, mixture_of, open_split)


class TrainError(RuntimeError):
    """A user-facing problem found before or during training (bad data, mismatch, ...)."""


# -----------------------------------------------------------------------------
# The loss (compute_sft_loss, with SFTDataset and load_checkpoint, are the entry points the SFT
# spec names in this file) and one optimizer step's forward and backward passes

def compute_sft_loss(model, input_ids, labels, ignore_index=IGNORE_INDEX):
    """Mean cross-entropy over the trained tokens (labels aligned with input_ids, shifted inside)."""
    if ignore_index != IGNORE_INDEX:
        labels = labels.masked_fill(labels == ignore_index, IGNORE_INDEX)
    _, loss = model(input_ids, labels=labels)
    return loss


def forward_backward(model, batches, dev, world=1, ddp=False, autocast=nullcontext(), scaler=None,
                     all_reduce=lambda t: t, fsdp=False):
    """
    Accumulate one optimizer step's gradients over this rank's micro-batches.
    Token weighting: the step's trained targets are counted first (all micro-batches of this rank,
    then one all-reduce over ranks), and each micro-batch adds sum(loss) / that count, so every trained
    token weighs the same whatever the padding, accumulation or GPU count. Returns, on device and
    without a host sync, (summed loss, trained tokens, all tokens) of this rank.
    """
    # The trained positions are found here, on the CPU batches: on the device it would cost a sync.
    indices = [trained_positions(b['labels']) for b in batches]
    local = sum(len(i) for i in indices)
    total = all_reduce(torch.tensor([float(local)], dtype=torch.float64).to(dev, non_blocking=True))
    # No trained token anywhere: a denominator of 1 keeps every contribution exactly 0, not NaN.
    denom = total[0].clamp(min=1.0).float()
    stats = torch.zeros(3, dtype=torch.float64, device=dev)
    for m, (batch, index) in enumerate(zip(batches, indices)):
        kw = model_inputs(batch, dev)
        # DDP all-reduces gradients only on the last micro-step. FSDP reduce-scatters at every one:
        # skipping it keeps a full-size fp32 gradient on every rank between micro-steps (4 bytes per
        # parameter, not 4/N: +32 GB for an 8B model), to save a reduce-scatter that is cheap next to
        # a micro-step's compute.
        with (model.no_sync() if ddp and not fsdp and m < len(batches) - 1 else nullcontext()):
            with autocast:
                _, loss_sum = model(**kw, reduction='sum', trained_index=index.to(dev, non_blocking=True))
            # x world: DDP and FSDP average gradients over ranks, but the global count already normalized.
            loss = loss_sum.float() / denom * world
            (scaler.scale(loss) if scaler is not None else loss).backward()
        stats[0] += loss_sum.detach().double()
        stats[1] += len(index)
        stats[2] += batch['input_ids'].numel()
    return stats


def gradients(cfg, rt: 'Runtime', model, raw_model, optimizer, scaler, batches, stop_requested: bool):
    """One step's clipped gradients -> (step stats, grad norm, stop?, non-finite loss?), with one host
    sync. The flags are agreed on over ranks (MAX): a signal seen by any rank stops all; a non-finite
    loss on any rank makes the step a NaN step. The grad norm is the same on every rank (gradients are
    all-reduced), so every rank takes the same skip / stop decision."""
    step_stats = forward_backward(model, batches, rt.device, rt.world, rt.ddp, rt.autocast, scaler,
                                  rt.all_reduce, rt.fsdp)
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float('inf'))
    if hasattr(grad_norm, 'full_tensor'):   # FSDP: a DTensor reduced over the shards; the global norm
        grad_norm = grad_norm.full_tensor()
    flags = rt.all_reduce(torch.stack([torch.tensor(float(stop_requested), device=rt.device),
                                       (~torch.isfinite(step_stats[0])).float()]), dist.ReduceOp.MAX)
    stop_now, bad_loss = (f > 0 for f in flags.tolist())
    return step_stats, grad_norm.item(), stop_now, bad_loss


def model_inputs(batch: dict, dev) -> dict:
    """A collated batch -> the model's keyword arguments on dev. Packed rows' document boundaries
    (cu_seqlens) stay on the host with their longest document read there, free: the model copies
    what its attention kernel needs, and nothing waits for the device."""
    kw = {k: v.to(dev, non_blocking=True) for k, v in batch.items() if k != 'cu_seqlens'}
    if 'cu_seqlens' in batch:
        cu = batch['cu_seqlens']
        kw.update(cu_seqlens=cu, max_seqlen=int(torch.diff(cu).max()))
    return kw


@torch.no_grad()
def estimate_loss(model, datasets: dict, cfg: TrainConfig, rt: 'Runtime') -> dict:
    """Token-weighted loss of each split on the same fixed batches at every evaluation, all ranks."""
    model.eval()
    out = {}
    for name, ds in datasets.items():
        units = ds.units(0)
        acc = torch.zeros(2, dtype=torch.float64, device=rt.device)
        if len(units):
            for batch in eval_batches(ds, units, cfg.eval_iters, rt.world, rt.rank, cfg.batch_size):
                with rt.autocast:
                    _, loss = model(**model_inputs(batch, rt.device), reduction='sum')
                acc[0] += loss.double()
                acc[1] += (batch['labels'][:, 1:] != IGNORE_INDEX).sum()   # targets: labels shifted
        rt.all_reduce(acc)
        out[name] = (acc[0] / acc[1]).item() if acc[1] > 0 else float('nan')
    model.train()
    return out


def evaluate(model, raw_model, train_ds, val_ds, gen, cfg: TrainConfig, rt: 'Runtime', iter_num: int,
             do_loss: bool, do_gen: bool, say) -> tuple[dict, dict]:
    """This iteration's evaluations (every rank): the loss of both splits and / or the generation
    evals. -> (the run log's record, the wandb record); says one line for each."""
    record, wb = {'iter': iter_num}, {'iter': iter_num}
    if do_loss:
        losses = estimate_loss(model, {'train': train_ds, 'val': val_ds}, cfg, rt)
        say(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        record.update(train_loss=losses['train'], val_loss=losses['val'])
        wb.update({'train/eval_loss': losses['train'], 'val/loss': losses['val']})
    if do_gen:
        g = sharded_eval(raw_model, gen, cfg.gen_eval_batch_size, rt.rank, rt.world, rt.all_reduce, rt.fsdp)
        say(f"gen eval iter {iter_num}: accuracy {100 * g['accuracy']:.1f}% ({g['correct']}/{g['with_reference']}), "
            f"format {100 * g['format_compliance']:.1f}% ({g['gen_eval_s']:.1f} s); "
            f"{g['sample']['prompt'][:40]!r} -> {(g['sample']['reply'] or '')[:40]!r}")
        record.update(g)
        wb.update({'val/accuracy': g['accuracy'], 'val/format_compliance': g['format_compliance']})
    return record, wb


METRIC_KEYS = {'val_loss': 'val_loss', 'accuracy': 'accuracy', 'format': 'format_compliance'}


def mixture_spec(ds: SFTDataset) -> dict | None:
    """What the sample order of a mixture depends on besides (seed, cursor): kept in the data
    state, so a resume that changed it says so."""
    m = ds.mixture
    return None if m is None else {'by': m.by, 'names': m.names, 'weights': m.weights.tolist()}


class BestMetric:
    """best_metric's best value so far and the evaluations since it (early stopping's patience);
    its state travels in the checkpoint, so a resumed run keeps counting."""

    def __init__(self, name: str):
        self.name, self.value, self.since = name, None, 0

    def update(self, value) -> bool:
        """Record this evaluation's value; True when it is a new best."""
        ok = value is not None and math.isfinite(value)
        better = ok and (self.value is None or
                         (value < self.value if self.name == 'val_loss' else value > self.value))
        if better:
            self.value, self.since = value, 0
        else:
            self.since += 1
        return better

    def state_dict(self) -> dict:
        return {'name': self.name, 'value': self.value, 'since': self.since}

    def load_state_dict(self, state: dict | None):
        if state and state.get('name') == self.name:
            self.value, self.since = state.get('value'), state.get('since', 0)


def get_lr(it: int, cfg) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# -----------------------------------------------------------------------------
# Set-up steps, in the order train() runs them

@dataclass
class Runtime:
    """Where this process runs (rank, world, device, precision) and the collectives the loop uses."""
    ddp: bool
    fsdp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    device_type: str
    dtype: str
    autocast: object

    @property
    def master(self) -> bool:
        return self.rank == 0

    def print0(self, *a):
        if self.master:
            say(*a)

    def all_reduce(self, t, op=dist.ReduceOp.SUM):
        if self.ddp:
            dist.all_reduce(t, op=op)
        return t


def cpu_has_fast(dtype: str) -> bool:
    """Whether this CPU multiplies `dtype` matrices in hardware (bf16: AVX512-BF16 or AMX; fp16:
    AMX-FP16), so autocast to it beats float32."""
    has = lambda what: getattr(torch.cpu, f'_is_{what}_supported', lambda: False)()  # noqa: E731  (private probes)
    if dtype == 'bfloat16':
        return has('avx512_bf16') or has('amx_tile')
    return dtype == 'float16' and has('amx_fp16')


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """torchrun sets RANK: join the process group; choose device, dtype and autocast."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        check_device(dev)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if dev.startswith('mps'):
        raise TrainError(f"device={dev!r}: train_sft trains on cuda or cpu")
    rank, local_rank, world = 0, 0, 1
    if ddp:
        if not dist.is_initialized():
            dist.init_process_group(backend=cfg.backend or ('nccl' if dev.startswith('cuda') else 'gloo'))
        rank, local_rank, world = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
        if dev.startswith('cuda'):
            dev = f'cuda:{local_rank}'
            torch.cuda.set_device(dev)
    device_type = 'cuda' if dev.startswith('cuda') else 'cpu'
    dtype = cfg.dtype or ('float32' if device_type == 'cpu' else
                          'bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
    dtype = {'bf16': 'bfloat16', 'fp16': 'float16', 'fp32': 'float32'}.get(dtype, dtype)
    fsdp = ddp and cfg.parallel == 'fsdp'   # one process: nothing to shard, plain training
    if fsdp and dtype == 'float16':
        raise TrainError("parallel='fsdp' trains in float32 or bfloat16 (float16 needs a sharded grad scaler)")
    autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type,
                                                                          dtype=getattr(torch, dtype))
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(ddp, fsdp, rank, local_rank, world, dev, device_type, dtype, autocast)


def load_data(cfg: TrainConfig, rt: Runtime) -> tuple[SFTDataset, SFTDataset, dict]:
    """The train and val splits as SFTDatasets, and the data's tokenizer description."""
    tokenizer = jsonl_tokenizer(cfg)
    train_split, val_split = (open_split(cfg.data_dir, s, tokenizer, cfg.train_on, cfg.chat_template,
                                         verify=cfg.verify_data) for s in ('train', 'val'))
    if cfg.verify_data and isinstance(train_split, ShardDataset) and not train_split.meta.get('sha256'):
        rt.print0(f"note: {cfg.data_dir}/meta.json has no shard digests (prepared by an older nanoSFT): "
                  f"the shards are not verified")
    tok = data_tokenizer(getattr(train_split, 'meta', None) or {})
    pad_id = int(tok['pad_id'] if tok.get('pad_id') is not None else DEFAULT_PAD_ID)
    mixture = mixture_of(train_split, cfg.mixture_by, cfg.seed)
    train_ds = SFTDataset(train_split, cfg.block_size, cfg.packing, pad_id, cfg.seed, mixture=mixture)
    val_ds = SFTDataset(val_split, cfg.block_size, cfg.packing, pad_id, cfg.seed, shuffle=False)
    rt.print0(f"data: {len(train_ds)} train / {len(val_ds)} val examples from {cfg.data_dir}")
    if len(val_ds) == 0:
        if cfg.best_metric == 'val_loss' and cfg.early_stopping_patience:
            raise TrainError(f"early_stopping_patience={cfg.early_stopping_patience} follows the val loss, but "
                             f"{cfg.data_dir} has no val examples (prepared with --val_fraction 0?)")
        rt.print0(f"note: {cfg.data_dir} has no val examples (prepared with --val_fraction 0?): the val loss "
                  f"is nan" + (", and no ckpt_best.pt is written" if cfg.best_metric == 'val_loss' else ''))
    if mixture is not None:
        rt.print0(f"mixture by {mixture.by} (an epoch = the split's {mixture.by}; epoch 0 realizes):")
        for r in mixture.report(0):
            rt.print0(f"  {r['name']}: weight {r['weight']:.3f} -> {100 * r['example_share']:.2f}% of examples, "
                      f"{100 * r['token_share']:.2f}% of trained tokens, {r['passes']:.2f} passes/epoch "
                      f"over its {r['examples']} examples")
    elif cfg.mixture_by:
        rt.print0(f"note: mixture_by={cfg.mixture_by!r} has no effect: {cfg.data_dir} has no weighted sources")
    return train_ds, val_ds, tok


def jsonl_tokenizer(cfg: TrainConfig) -> str:
    """The tokenizer of .jsonl data; with init_from='hf:DIR' it must fit DIR's model, which is
    checked here, before any text is tokenized."""
    name, hf_dir = cfg.tokenizer, cfg.init_from[3:] if cfg.init_from.startswith('hf:') else None
    if name == 'auto':
        name = hf_dir if hf_dir and os.path.isfile(os.path.join(hf_dir, 'tokenizer.json')) else 'qwen3'
    if hf_dir and cfg.data_dir.endswith('.jsonl') and os.path.isfile(os.path.join(hf_dir, 'config.json')):
        from tokenizer import load_tokenizer
        with open(os.path.join(hf_dir, 'config.json')) as f:
            vocab = json.load(f).get('vocab_size')
        try:
            size = load_tokenizer(name).vocab_size
        except ValueError as e:
            raise TrainError(f"tokenizer={name}: {e}") from None
        if isinstance(vocab, int) and size > vocab:
            raise TrainError(f"tokenizer/model mismatch: tokenizer {name} has {size} tokens but {hf_dir} "
                             f"has vocab_size {vocab}; set tokenizer= to the model's own")
    return name


def load_gen_eval(cfg: TrainConfig, tok: dict) -> HeldOut | None:
    """The generation evals' held-out set, rendered in the data's chat format and checked now,
    before any work (see gen_eval.load_held_out)."""
    if not cfg.gen_eval_data:
        return None
    return load_held_out(cfg.gen_eval_data, tok, cfg.block_size, cfg.gen_eval_max_new_tokens,
                         cfg.gen_eval_limit or None)


def data_tokenizer(meta: dict) -> dict:
    """The tokenizer description of a data set (meta.json keeps it under 'tokenizer')."""
    tok = meta.get('tokenizer')
    tok = dict(tok) if isinstance(tok, dict) else {'name': tok}
    for key in ('hash', 'vocab_size', 'special_tokens', 'pad_id'):
        if tok.get(key) is None and meta.get(key) is not None:
            tok[key] = meta[key]
    tok.setdefault('special_tokens', {})
    return tok


def lora_config(cfg: TrainConfig, dtype: str = 'float32') -> LoRAConfig:
    try:
        return LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          targets=cfg.lora_targets, rslora=cfg.lora_rslora, dora=cfg.lora_dora,
                          quantize=cfg.finetune == 'qlora', quantize_embeddings=cfg.lora_quantize_embeddings,
                          base_dtype=resolve_base_dtype(cfg.lora_base_dtype, dtype))
    except LoRAError as e:
        raise TrainError(f"finetune={cfg.finetune!r}: {e}") from e


def is_peft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, 'adapter_config.json'))


def scratch_architecture(cfg: TrainConfig):
    """init_from='scratch': the preset with the config's architecture keys on top."""
    from model_config import ModelArchitectureConfig
    arch = ModelArchitectureConfig.from_preset(cfg.model_preset).to_dict() if cfg.model_preset else {}
    for k in ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'head_dim', 'intermediate_size', 'vocab_size'):
        if getattr(cfg, k) is not None:
            arch[k] = getattr(cfg, k)
    arch.update(block_size=cfg.block_size, dropout=cfg.dropout)
    try:
        return ModelArchitectureConfig.from_dict(arch)
    except (TypeError, ValueError) as e:
        raise TrainError(f"init_from='scratch': bad model config: {e}") from e


def build_model(cfg: TrainConfig, device, log=say, dtype: str = 'float32') -> tuple[ConfigurableGPT, dict | None,
                                                                                 dict | None]:
    """The starting model from init_from -> (model, its checkpoint dict or None, the LoRA base record
    or None). finetune='lora'/'qlora': the base is frozen and adapters added (or continued: from a
    LoRA checkpoint or a PEFT adapter directory, whose rank, alpha and targets then hold)."""
    init, ckpt, base = cfg.init_from, None, None
    lora_run = cfg.finetune != 'full'
    want = lora_config(cfg, dtype) if lora_run else None
    if cfg.lora_base and not (is_peft_dir(init) or init == 'resume' or init.endswith('.pt')):
        raise TrainError(f"lora_base={cfg.lora_base!r} names the base of a PEFT adapter directory or of a "
                         f"LoRA checkpoint; init_from={init!r} is neither")
    try:
        if init == 'scratch':
            if lora_run:
                raise TrainError(f"finetune={cfg.finetune!r} adapts a trained base: set init_from to a "
                                 f"checkpoint or 'hf:/local/hf/dir' (a frozen random base learns little)")
            model = ConfigurableGPT(scratch_architecture(cfg))
        elif is_peft_dir(init):   # an adapter trained elsewhere (PEFT), continued here
            if not lora_run:
                raise TrainError(f"init_from={init} is a PEFT adapter directory: continue it with "
                                 f"finetune='lora' or 'qlora'")
            if not cfg.lora_base:
                raise TrainError(f"init_from={init} is a PEFT adapter directory: lora_base= must name its "
                                 f"base ('hf:/local/hf/dir' or a checkpoint)")
            peft_cfg, tensors = read_peft_adapter(init)
            peft_cfg = dataclasses.replace(peft_cfg, dropout=want.dropout, quantize=want.quantize,
                                           quantize_embeddings=want.quantize_embeddings, base_dtype=want.base_dtype)
            model, base = lora_model(base_source(cfg.lora_base), peft_cfg, adapters=tensors, peft=True,
                                     device=device, seed=cfg.seed, where=init)
        elif init.startswith('hf:'):
            from hf_interop import from_hf
            if not os.path.isdir(init[3:]):
                raise TrainError(f"init_from={init}: directory not found: {init[3:]}")
            try:
                # a LoRA base as stored (bf16: half of fp32 in host memory): apply_lora sets the dtypes
                model = from_hf(init[3:], dtype=None if lora_run else torch.float32)
            except (OSError, ValueError) as e:
                raise TrainError(f"init_from={init}: {e}") from e
        else:
            path = os.path.join(cfg.out_dir, 'ckpt.pt') if init == 'resume' else init
            if not os.path.exists(path):
                raise TrainError(f"init_from={init}: checkpoint not found: {path}")
            if init == 'resume' and is_sharded_checkpoint(path):
                if lora_run:
                    raise TrainError(f"init_from=resume: {path} is a sharded checkpoint of full fine-tuning; "
                                     f"finetune={cfg.finetune!r} resumes LoRA checkpoints (one file)")
                # an empty (meta) model: parallelize() allocates it, sharded or not, and
                # restore_training_state reads each rank's part of the weights
                model, ckpt = open_sharded_checkpoint(path, dropout=cfg.dropout)
            else:
                # a LoRA checkpoint continues with this run's dropout; resumed, it keeps its base as it was
                over = {'dropout': want.dropout} if lora_run else None
                if lora_run and init != 'resume':
                    over.update(quantize=want.quantize, quantize_embeddings=want.quantize_embeddings,
                                base_dtype=want.base_dtype)
                moved = base_source(cfg.lora_base) if cfg.lora_base else None
                model, ckpt = load_checkpoint(path, device=device if lora_run else 'cpu', dropout=cfg.dropout,
                                              base=moved, lora_overrides=over)
                if ckpt.get('lora') is not None:
                    base = dict(ckpt.get('base') or {}, **({'source': moved} if moved else {}))
    except (CheckpointError, LoRAError) as e:
        raise TrainError(f"init_from={init}: {e}") from e
    if init != 'scratch':
        check_no_architecture_overrides(cfg, model.config)

    adapted = getattr(model, 'lora_config', None)
    if adapted is not None and not lora_run:
        if init == 'resume':
            raise TrainError(f"{cfg.out_dir}/ckpt.pt is a LoRA checkpoint: resume it with finetune='lora' "
                             f"or 'qlora'")
        model, base = merge_lora(model), None   # full fine-tuning of the merged model
    elif adapted is not None:
        if init == 'resume' and (adapted.quantize, adapted.quantize_embeddings) != (
                want.quantize, want.quantize_embeddings):
            raise TrainError(f"{cfg.out_dir}/ckpt.pt was trained with finetune="
                             f"{'qlora' if adapted.quantize else 'lora'}, lora_quantize_embeddings="
                             f"{adapted.quantize_embeddings}; resume with the same base "
                             f"(or start a new run from it with init_from=<that ckpt>)")
        mine = {k: getattr(want, k) for k in ('rank', 'alpha', 'targets', 'rslora', 'dora', 'base_dtype')}
        theirs = {k: getattr(adapted, k) for k in mine}
        if mine != theirs:
            log(f"note: continuing the adapters of {init} as they are ({theirs}); lora_* settings "
                f"that differ ({ {k: v for k, v in mine.items() if v != theirs[k]} }) do not apply")
    elif lora_run:
        base = {'source': base_source(init), **base_fingerprint(model)}
        if want.quantize:
            base['quantizer'] = quantizer_version()
        try:
            apply_lora(model, want, seed=cfg.seed, device=device)
        except LoRAError as e:
            raise TrainError(f"init_from={init}: {e}") from e
    lora = getattr(model, 'lora_config', None)
    if lora is not None and lora.base_dtype == 'bfloat16' and dtype == 'bfloat16':
        hold_embeddings_in(model, torch.bfloat16)   # under bf16 autocast every use of them is bf16
    set_dropout(model, cfg.dropout)
    model.config.attention = cfg.attention     # how, not what: a training choice like dropout
    model.set_activation_checkpointing(cfg.activation_checkpointing, cfg.activation_checkpointing_every)
    if cfg.block_size > model.config.block_size:
        raise TrainError(f"block_size={cfg.block_size} is larger than the model's block_size "
                         f"{model.config.block_size}")
    return (model if is_empty(model) else model.to(device)), ckpt, base


def check_finetune(cfg: TrainConfig, rt: 'Runtime') -> None:
    """LoRA / QLoRA settings that cannot work here, refused before a weight is read."""
    if cfg.finetune == 'full':
        return
    if cfg.checkpoint_format == 'sharded':
        raise TrainError(f"finetune={cfg.finetune!r} saves one-file checkpoints (the adapters are small, "
                         f"the base is named, not stored): checkpoint_format='auto' or 'file'")
    try:
        check_qlora_device(lora_config(cfg), getattr(torch, rt.dtype), rt.device_type)
    except LoRAError as e:
        raise TrainError(str(e)) from e
    if cfg.lora_quantize_embeddings and cfg.parallel == 'fsdp':
        # FSDP would shard the NF4 table, whose rows the lookup and the loss read directly
        raise TrainError("lora_quantize_embeddings=True with parallel='fsdp': the NF4 embedding table is "
                         "not sharded; use parallel='ddp' (the table is 4-bit: replicating it costs little)")


def describe_model(cfg: TrainConfig, rt: 'Runtime', model, base: dict | None) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = getattr(model, 'lora_config', None)
    wte = model.transformer.wte.weight
    emb = 'nf4' if is_nf4(wte) else str(wte.dtype).removeprefix('torch.')
    held = '' if lora is None else (f", frozen projections in {'nf4' if lora.quantize else lora.base_dtype}, "
                                    f"embedding in {emb}")
    rt.print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({trainable / 1e6:.3f}M trained, finetune={cfg.finetune}{held}), init_from={cfg.init_from}"
              + (f", base {base['source']} (sha256 {base['sha256'][:12]})" if base else ''))
    try:
        rt.print0(describe_attention(cfg.attention, rt.device_type, getattr(torch, rt.dtype), cfg.dropout,
                                     cfg.packing, cfg.block_size, cfg.activation_checkpointing,
                                     cfg.activation_checkpointing_every))
    except ValueError as e:   # e.g. attention='varlen' where the flash kernel does not run
        raise TrainError(str(e)) from None


def data_order(cfg: TrainConfig, train_ds: SFTDataset) -> dict:
    """What decides the order of the training units the sampler's cursor walks."""
    return {'seed': cfg.seed, 'packing': cfg.packing, 'block_size': cfg.block_size, 'examples': len(train_ds)}


def is_empty(model) -> bool:
    return next(model.parameters()).is_meta


ARCH_KEYS = {'n_layer': 'n_layer', 'n_head': 'n_head', 'n_kv_head': 'kv_heads', 'n_embd': 'n_embd',
             'head_dim': 'head_size', 'intermediate_size': 'ffn_size', 'vocab_size': 'vocab_size'}


def check_no_architecture_overrides(cfg: TrainConfig, config) -> None:
    """Architecture keys shape a model built from scratch; a checkpoint or HF start brings its own.
    One that disagrees with it would be silently ignored: refuse it instead."""
    clash = [f"{k}={getattr(cfg, k)} (the model has {getattr(config, attr)})" for k, attr in ARCH_KEYS.items()
             if getattr(cfg, k) is not None and getattr(cfg, k) != getattr(config, attr)]
    if clash:
        raise TrainError(f"init_from={cfg.init_from}: the architecture comes from the checkpoint / model "
                         f"directory, so {', '.join(clash)} cannot apply; drop these keys (they shape "
                         f"init_from='scratch' models only)")


def schedule_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that silently train little or nothing (seen on short runs with the defaults)."""
    out = []
    if cfg.max_iters == 0:
        return out
    if cfg.decay_lr and cfg.warmup_iters >= cfg.max_iters:
        out.append(f"warmup_iters={cfg.warmup_iters} >= max_iters={cfg.max_iters}: the learning rate "
                   f"never reaches learning_rate={cfg.learning_rate:g} (the run ends "
                   f"{100 * cfg.max_iters / (cfg.warmup_iters + 1):.0f}% of the way up the warmup); "
                   f"lower warmup_iters")
    if cfg.decay_lr and cfg.lr_decay_iters != cfg.max_iters:
        how = (f"ends at step {cfg.lr_decay_iters}, then min_lr={cfg.min_lr:g} holds" if cfg.lr_decay_iters < cfg.max_iters
               else f"is cut off at step {cfg.max_iters}, before it reaches min_lr={cfg.min_lr:g}")
        out.append(f"lr_decay_iters={cfg.lr_decay_iters} differs from max_iters={cfg.max_iters}: the cosine "
                   f"decay {how}; usually lr_decay_iters = max_iters")
    if cfg.init_from == 'scratch' and cfg.learning_rate < 1e-4:
        out.append(f"init_from='scratch' with learning_rate={cfg.learning_rate:g}, a fine-tuning rate: "
                   f"training a model from random weights usually needs 3e-4 to 3e-3")
    return out


def set_dropout(model, p: float):
    """Dropout is a training choice: override whatever the checkpoint/HF config had."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, 'dropout', None), float):
            m.dropout = p


def check_data_fits_model(cfg: TrainConfig, model, tok: dict, ckpt: dict | None, datasets) -> None:
    """Every token id of the data must be a row of the model's embedding, else training is garbage."""
    vocab, where = model.config.vocab_size, cfg.data_dir
    if tok.get('vocab_size') is not None and int(tok['vocab_size']) > vocab:
        raise TrainError(f"{where}: tokenizer/model mismatch: the data's tokenizer {tok.get('name')!r} has "
                         f"{tok['vocab_size']} tokens but the model's vocab_size is {vocab}")
    max_special = max((int(v) for v in tok['special_tokens'].values()), default=-1)
    if max_special >= vocab:
        raise TrainError(f"{where}: tokenizer/model mismatch: special token id {max_special} does not fit "
                         f"the model's vocab_size {vocab}")
    data_hash, ckpt_tok = tok.get('hash'), (ckpt or {}).get('tokenizer') or {}
    if data_hash and ckpt_tok.get('hash') and data_hash != ckpt_tok['hash']:
        raise TrainError(f"{where}: tokenizer mismatch: the data was tokenized with {tok.get('name')!r} "
                         f"(hash {data_hash[:12]}) but the checkpoint was trained on "
                         f"{ckpt_tok.get('name')!r} (hash {ckpt_tok['hash'][:12]})")
    for name, ds in datasets.items():
        shard = where if where.endswith('.jsonl') else os.path.join(where, f'{name}.bin')
        check_token_ids(ds.data, vocab, shard)


def check_nf4_shardable(model, world: int) -> None:
    """FSDP shards each NF4 weight by rows together with its block scales (torchao): each rank needs
    whole groups of 256 x 64 weights, so the groups of every NF4 weight must divide by world. One
    rank: FSDP2 skips the all-gather there, and torchao's NF4 unsharding then fails mid-forward."""
    if world == 1:
        raise TrainError("finetune='qlora' with parallel='fsdp' on 1 rank: FSDP2 cannot unshard torchao's "
                         "NF4 weights without a gather; one process has nothing to shard, use parallel='ddp'")
    for name, p in model.named_parameters():
        if is_nf4(p) and (p.quantization_factor.numel() % world or p.shape[0] % world):
            raise TrainError(f"finetune='qlora' with parallel='fsdp' on {world} ranks: {name} {tuple(p.shape)} "
                             f"has {p.quantization_factor.numel()} NF4 scale groups, not divisible by {world}; "
                             f"use parallel='ddp' (or fewer ranks) for a model this small")


def parallelize(cfg: TrainConfig, rt: Runtime, model, ckpt, sampler, global_batch):
    """Shard (FSDP) the model, build AdamW and restore the training state on resume, then compile
    and wrap (DDP). -> (model to call, the unwrapped model, optimizer, scaler, iter_num,
    best_val_loss, resumed_at)."""
    lora = getattr(model, 'lora_config', None)
    empty = is_empty(model)   # resuming from a sharded checkpoint: the weights come with the training state
    if rt.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, rt.dtype), reduce_dtype=torch.float32) \
            if rt.device_type == 'cuda' and rt.dtype != 'float32' else MixedPrecisionPolicy()
        # DDP broadcasts rank 0's weights at wrap time, FSDP does not: ranks seeded differently would
        # each keep a shard of their own random init. A LoRA model needs no broadcast: every rank
        # loaded the same base (its hash checked) and drew the adapters from the same seeded generator.
        for v in model.state_dict().values() if not empty and lora is None else ():
            dist.broadcast(v, src=0)
        if lora is not None and lora.quantize:
            check_nf4_shardable(model, rt.world)
        for block in model.transformer.h:   # the frozen base is sharded like the rest (NF4 too)
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    if empty:   # after fully_shard: each rank allocates only its shard
        materialize(model, rt.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=(rt.dtype == 'float16'))
    iter_num, best_val_loss, resumed_at = 0, float('inf'), None
    if cfg.init_from == 'resume':
        iter_num, best_val_loss, resumed_at = restore_training_state(
            ckpt, model, optimizer, scaler=scaler, sampler=sampler, fsdp=rt.fsdp,
            global_batch=global_batch, log=rt.print0)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if rt.ddp and not rt.fsdp:
        # LoRA: no broadcast of the frozen base at wrap time (see above; NF4 tensors cannot be broadcast)
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == 'cuda' else None,
                    init_sync=lora is None)
    return model, raw_model, optimizer, scaler, iter_num, best_val_loss, resumed_at


class RunLog:
    """run_<timestamp>.json in out_dir (rewritten atomically at each evaluation and at the end) and,
    with wandb_log, Weights & Biases. Only rank 0 writes. The out_dir is checked writable now, not
    at the first checkpoint hours later."""

    def __init__(self, cfg: TrainConfig, rt: Runtime):
        self.master, self.wandb = rt.master, None
        self.data = {'config': dataclasses.asdict(cfg), 'iters': [], 'evals': [], 'summary': {}}
        if not self.master:
            return
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=cfg.out_dir):
                pass
        except OSError as e:
            raise TrainError(f"out_dir {cfg.out_dir}: cannot write there ({e.strerror or e})") from e
        stamp = datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S')
        self.path = os.path.join(cfg.out_dir, f'run_{stamp}.json')
        for n in range(1, 100):   # a quick resume must not overwrite the previous run's log
            if not os.path.exists(self.path):
                break
            self.path = os.path.join(cfg.out_dir, f'run_{stamp}_{n}.json')
        if cfg.wandb_log:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name,
                                        config=self.data['config'])
            except ImportError:
                rt.print0("warning: wandb_log=True but wandb is not installed; logging to run_*.json only")

    def log(self, kind: str, record: dict, wandb_record: dict | None = None):
        self.data[kind].append(record)
        if self.wandb is not None and wandb_record:
            self.wandb.log(wandb_record)

    def write(self, summary: dict | None = None):
        if summary is not None:
            self.data['summary'] = summary
        if not self.master:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, 'w') as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)
        if summary is not None and self.wandb is not None:
            self.wandb.finish()


class StopSignal:
    """SIGTERM / SIGINT set a flag (the loop finishes its step, saves ckpt.pt and exits); a context
    manager that restores the previous handlers. Signals can only be caught in the main thread.
    The handler only records the signal: printing from it could raise (a reentrant write to a stdout
    the loop is writing, or a pipe the same Ctrl-C has closed) and lose the save."""

    def __init__(self):
        self.signum, self.old = 0, {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _on_signal(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


class StepMeter:
    """(loss sum, trained tokens, all tokens) summed on the device since the last log line, so the
    loop makes no host sync per step for them; read() all-reduces (a collective: every rank)."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, model):
        self.rt, self.acc = rt, torch.zeros(3, dtype=torch.float64, device=rt.device)
        self.flops_per_token = train_flops_per_token(model, cfg.block_size)
        self.peak = cfg.peak_flops or guess_peak_flops(rt.device_type, rt.dtype)
        if rt.device_type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        self.t_start = self.t_last = time.time()
        self.excluded = 0.0

    def add(self, step_stats):
        self.acc += step_stats

    def exclude(self, seconds: float):
        """Time since the last log line that was not training (evaluation, checkpoints): not in tok/s."""
        self.excluded += seconds

    def read(self, iter_num, lr, grad_norm) -> dict:
        stats = self.rt.all_reduce(self.acc.clone())
        self.acc.zero_()
        now = time.time()
        dt, self.t_last = max(now - self.t_last - self.excluded, 1e-9), now
        self.excluded = 0.0
        trained, total = stats[1].item(), stats[2].item()
        rec = {'iter': iter_num, 'loss': stats[0].item() / max(trained, 1.0), 'lr': lr, 'grad_norm': grad_norm,
               'tokens': int(total), 'trained_tokens': int(trained), 'tok_per_s': total / dt,
               'trained_tok_per_s': trained / dt, 'time': now - self.t_start}
        if self.rt.device_type == 'cuda':
            rec['mfu'] = self.flops_per_token * total / dt / self.rt.world / self.peak if self.peak else 0.0
            rec['peak_mem_gib'] = torch.cuda.max_memory_allocated() / 2**30
        return rec

    @staticmethod
    def line(r: dict) -> str:
        line = (f"iter {r['iter']}: loss {r['loss']:.4f}, lr {r['lr']:.3e}, grad norm {r['grad_norm']:.3f}, "
                f"tok/s {r['trained_tok_per_s']:,.0f} trained / {r['tok_per_s']:,.0f} total")
        if 'mfu' in r:
            line += f", mfu {100 * r['mfu']:.1f}%, peak mem {r['peak_mem_gib']:.1f} GiB"
        return line


def train_flops_per_token(model, seq_len: int) -> int:
    """PaLM's 6N + attention (ModelArchitectureConfig.flops_per_token), less what a LoRA run does not
    compute: a frozen weight costs its forward and input-gradient matmuls (4 per weight), not 6; each
    adapter weight costs 6."""
    flops = model.config.flops_per_token(seq_len)
    if getattr(model, 'lora_config', None) is None:
        return flops
    c = model.config
    head = c.vocab_size * c.n_embd
    frozen = c.num_params(non_embedding=True) + head * (not model.lm_head.weight.requires_grad)
    adapters = sum(p.numel() for n, p in model.named_parameters() if '.lora_' in n)
    return flops - 2 * frozen + 6 * adapters


def guess_peak_flops(device_type, dtype: str = 'bfloat16'):
    """Dense tensor-core peak per GPU from its name: bf16 / fp16, or TF32 (half of that) for float32."""
    if device_type != 'cuda':
        return 0.0
    name = torch.cuda.get_device_name()
    flops = 312e12
    for key, f in (('H200', 989e12), ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12),
                   ('A100', 312e12), ('L40', 181e12), ('A10', 125e12), ('4090', 165e12), ('3090', 71e12)):
        if key in name:
            flops = f
            break
    return flops / 2 if dtype == 'float32' else flops


# -----------------------------------------------------------------------------
# The run

def train(cfg: TrainConfig) -> dict:
    """Run the training described by the config; returns the run summary."""
    rt = setup_runtime(cfg)
    A, B = cfg.gradient_accumulation_steps, cfg.batch_size
    G = rt.world * A * B
    rt.print0("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in dataclasses.asdict(cfg).items()))
    rt.print0(f"world_size={rt.world} global batch={G} rows ({rt.world} x {A} accum x {B} rows), "
              f"{rt.device_type} " + ('float32' if rt.dtype == 'float32' else f"{rt.dtype} autocast (fp32 weights)"))
    if rt.device_type == 'cpu' and rt.dtype != 'float32' and not cpu_has_fast(rt.dtype):
        rt.print0(f"warning: this CPU has no {rt.dtype} matrix instructions: dtype={rt.dtype} runs emulated, "
                  f"slower than float32")
    for w in schedule_warnings(cfg):
        rt.print0(f"warning: {w}")
    train_ds, val_ds, tok = load_data(cfg, rt)            # before the model: bad data fails fast
    gen = load_gen_eval(cfg, tok)                           # the held-out set too
    if gen is not None:
        rt.print0(f"generation evals: {len(gen.records)} conversations from {gen.path} every "
                  f"{cfg.gen_eval_interval or cfg.eval_interval} steps, replies up to {gen.max_new_tokens} "
                  f"tokens ({rt.world} rank(s) share them)")
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(cfg.seed + rt.rank)
    check_finetune(cfg, rt)                                 # before anything is loaded
    model, ckpt, base = build_model(cfg, rt.device, rt.print0, rt.dtype)
    check_data_fits_model(cfg, model, tok, ckpt, {'train': train_ds, 'val': val_ds})
    describe_model(cfg, rt, model, base)
    sampler = GlobalSampler(train_ds)
    model, raw_model, optimizer, scaler, iter_num, best_val_loss, resumed_at = \
        parallelize(cfg, rt, model, ckpt, sampler, G)
    best = BestMetric(cfg.best_metric)
    if cfg.init_from == 'resume':
        best.load_state_dict(ckpt.get('best_metric'))
        saved = ckpt.get('data_state') or {}
        if (saved.get('mixture') or None) != mixture_spec(train_ds):
            rt.print0("warning: the data mixture (sources, weights or mixture_by) changed since the "
                      "checkpoint: the sample order will differ from an uninterrupted run")
        # the saved cursor is a position in the order these make: with another order it points
        # elsewhere, and the rest of the epoch repeats some examples and skips others
        changed = [f"{k} {saved[k]} -> {now}" for k, now in data_order(cfg, train_ds).items()
                   if k in saved and saved[k] != now]
        if changed:
            rt.print0(f"warning: {', '.join(changed)} since the checkpoint: the data cursor (epoch "
                      f"{saved.get('epoch')}, position {saved.get('position')}) now points into another "
                      f"order, so the rest of this epoch repeats some examples and skips others")
    ckpt = None  # free the checkpoint's tensors
    run_log = RunLog(cfg, rt)
    extra = {'config': dataclasses.asdict(cfg), 'tokenizer': tok}
    if base is not None:
        extra['base'] = base   # a LoRA checkpoint names its frozen base instead of holding it

    def save(step_file, is_best=False):
        state = dict(extra, data_state={**sampler.state_dict(), 'global_batch': G, **data_order(cfg, train_ds),
                                        'mixture': mixture_spec(train_ds)},
                     best_metric=best.state_dict())
        if scaler.is_enabled():
            state['scaler'] = scaler.state_dict()
        return save_training_state(cfg.out_dir, raw_model, optimizer, iter_num=iter_num,
                                   best_val_loss=best_val_loss, step_file=step_file, is_best=is_best,
                                   keep_last_n=cfg.keep_last_n, fsdp=rt.fsdp, extra=state,
                                   sharded=cfg.checkpoint_format == 'sharded' or (cfg.checkpoint_format == 'auto'
                                                                                  and rt.fsdp and base is None))

    meter = StepMeter(cfg, rt, raw_model)
    bar = Progress(cfg.max_iters, 'sft', 'step', initial=iter_num, every=None, enabled=rt.master)
    nan_streak, skipped, last_val, last_loss = 0, 0, None, None
    early_stop, gen_time = False, 0.0
    with StopSignal() as stop:
        while True:
            # ---- evaluate (loss, and greedy replies when gen_eval_data is set) and save a step
            # checkpoint; not again at the iteration we resumed from
            at_end, fresh = iter_num >= cfg.max_iters, iter_num != resumed_at
            do_loss = (iter_num % cfg.eval_interval == 0 and fresh) or at_end or cfg.eval_only
            do_gen = gen is not None and (
                (iter_num % (cfg.gen_eval_interval or cfg.eval_interval) == 0 and fresh) or at_end or cfg.eval_only)
            if do_loss or do_gen:
                t_eval = time.time()
                record, wb = evaluate(model, raw_model, train_ds, val_ds, gen, cfg, rt, iter_num, do_loss, do_gen,
                                      bar.write)
                last_val = record.get('val_loss', last_val)
                gen_time += record.get('gen_eval_s', 0.0)
                run_log.log('evals', record, wb)
                if cfg.eval_only:
                    break
                # Iteration 0 is saved only by a 0-step run: the starting model as a checkpoint (an HF
                # import, or the demo's untrained base model to compare against).
                if do_loss and (iter_num > 0 or at_end) and fresh:
                    if math.isfinite(last_val):
                        best_val_loss = min(best_val_loss, last_val)
                    is_best = best.update(record.get(METRIC_KEYS[cfg.best_metric]))
                    bar.write(save(step_file=True, is_best=is_best))
                    # rank-uniform: the metrics are all-reduced, and the flag is agreed on over ranks
                    patience_out = cfg.early_stopping_patience and best.since >= cfg.early_stopping_patience
                    early_stop = rt.all_reduce(torch.tensor([float(patience_out)], device=rt.device),
                                               dist.ReduceOp.MAX).item() > 0
                run_log.write()
                meter.exclude(time.time() - t_eval)
                if early_stop and not at_end:
                    bar.write(f"early stopping at iter {iter_num}: {cfg.best_metric} has not improved on "
                              f"{best.value:.4g} for {best.since} evaluations (early_stopping_patience="
                              f"{cfg.early_stopping_patience})")
                    break
            if at_end:
                break

            # ---- one optimizer step: forward/backward over the micro-batches, clip, AdamW
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr
            batches = [train_ds.collate(units) for units in sampler.next_step(rt.world, rt.rank, A, B)]
            step_stats, gn, stop_now, bad_loss = gradients(cfg, rt, model, raw_model, optimizer, scaler, batches,
                                                           stop.requested)
            # Under fp16 a non-finite grad norm with a finite loss is an overflow: the scaler skips the step.
            if not math.isfinite(gn) and (bad_loss or not scaler.is_enabled()):
                nan_streak, skipped = nan_streak + 1, skipped + 1
                optimizer.zero_grad(set_to_none=True)
                scaler.update()   # fp16: closes this step's unscale_ (a no-op without a scaler)
                bar.write(f"iter {iter_num}: non-finite grad norm ({gn}); skipping this step "
                          f"({nan_streak} in a row, max_nan_steps={cfg.max_nan_steps})")
                if nan_streak >= cfg.max_nan_steps:
                    raise TrainError(f"aborting: {nan_streak} non-finite steps in a row (iter {iter_num}); "
                                     f"lower learning_rate, check the data, or use bf16/fp32")
            else:
                nan_streak = 0
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                meter.add(step_stats)   # a skipped NaN step stays out of the logged loss
            iter_num += 1
            bar.update(1)

            # ---- log: loss per trained token, throughput (MFU and memory on CUDA), time left
            if iter_num % cfg.log_interval == 0 or stop_now or iter_num >= cfg.max_iters:
                rec = meter.read(iter_num, lr, gn)   # a collective: every rank
                last_loss = rec['loss']
                bar.write(f"{meter.line(rec)}, {bar.eta()}")
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                run_log.log('iters', rec, {'iter': iter_num, 'train/loss': last_loss, 'lr': lr,
                                           'grad_norm': gn, 'tok_per_s': rec['tok_per_s']})

            if stop_now and iter_num < cfg.max_iters:
                if stop.signum:   # every rank that got the signal says so (not from the handler: see StopSignal)
                    say(f"[rank {rt.rank}] got signal {stop.signum}: finishing this step, then saving ckpt.pt")
                bar.write(f"stop requested: saving ckpt.pt at iter {iter_num} and exiting")
                bar.write(save(step_file=False))
                break
    bar.close()

    summary = summarize(cfg, rt, iter_num, time.time() - meter.t_start, best_val_loss, best,
                        last_val=last_val, last_train_loss=last_loss, skipped_steps=skipped,
                        truncated_examples=train_ds.truncated,
                        early_stopped=early_stop and iter_num < cfg.max_iters,
                        gen_eval_time_s=gen_time if gen is not None else None)
    run_log.write(summary)
    return summary


def summarize(cfg: TrainConfig, rt: Runtime, iter_num: int, wall: float, best_val_loss: float,
              best: BestMetric, last_val, last_train_loss, skipped_steps: int, truncated_examples: int,
              early_stopped: bool, gen_eval_time_s: float | None) -> dict:
    """The run summary train() returns and writes last into run_*.json."""
    summary = {'iters': iter_num, 'best_val_loss': best_val_loss if math.isfinite(best_val_loss) else None,
               'last_val_loss': last_val, 'last_train_loss': last_train_loss, 'skipped_steps': skipped_steps,
               'truncated_examples': truncated_examples, 'world_size': rt.world,
               'wall_time_s': wall, 'stopped_early': iter_num < cfg.max_iters,
               'early_stopped': early_stopped, 'best_metric': cfg.best_metric,
               'best_metric_value': best.value}
    if gen_eval_time_s is not None:
        g = gen_eval_time_s
        summary.update(gen_eval_time_s=g, gen_eval_share=g / wall if wall > 0 else None)
        rt.print0(f"generation evals took {g:.1f} s of {wall:.1f} s ({100 * g / max(wall, 1e-9):.1f}%)")
    if truncated_examples:
        rt.print0(f"note: {truncated_examples} training examples were longer than block_size "
                  f"{cfg.block_size} and were truncated")
    return summary


# -----------------------------------------------------------------------------
# --plan: will it fit? (memory_plan.py does the arithmetic; imported for --plan only)

def main(argv=None):
    from memory_plan import plan_args, planned_architecture, report_for_config
    argv = sys.argv[1:] if argv is None else argv
    try:
        if '-h' in argv or '--help' in argv:
            print(help_text(TrainConfig, argv, USAGE))
            return
        argv, planning = plan_args(argv)
        cfg = configure(TrainConfig, argv)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    try:
        if planning is not None:
            try:
                print(report_for_config(cfg, planned_architecture(cfg, scratch_architecture), **planning))
            except ValueError as e:
                raise TrainError(str(e)) from e
            return
        train(cfg)
        distributed = dist.is_initialized()
        if distributed:   # every rank done before any tears its connections down
            dist.barrier()
    except (TrainError, DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if distributed:
        # The run is complete and saved. A torchrun worker skips the interpreter's finalization, where
        # collective objects that outlive destroy_process_group can be freed without the GIL and abort
        # a finished rank ("terminate called without an active exception" on rank 1 after a final
        # sharded save, 2 of 3 full test runs on 2026-11-30; pytorch/pytorch#179291 describes it).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == '__main__':
    main()
