"""
Supervised fine-tuning, nanoGPT style: the globals below are the config, overwritten by a config file
and `--key=value` overrides (configurator.py). One process, or torchrun with DDP or FSDP (`--parallel=fsdp`):

    python train_sft.py configs/sft_demo_cpu.py
    torchrun --standalone --nproc_per_node=8 train_sft.py configs/sft_qwen3_1.8b.py

What this loop guarantees beyond the usual ones:
- every trained token weighs the same in a step, whatever the padding, accumulation or GPU count
  (loss = sum over trained tokens / trained tokens of the whole step, counted before backward);
- the examples an optimizer step sees depend only on (seed, step), not on how the global batch is
  split into ranks x micro-steps x rows;
- `init_from='resume'` continues bit-exactly (CPU) where ckpt.pt left off: model, optimizer, RNG
  states of every rank and the data cursor are in the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from datetime import datetime, timezone

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


# -----------------------------------------------------------------------------
# default config (every global below can be set from a config file or --key=value)
# I/O
out_dir = 'out-sft'
eval_interval = 200
log_interval = 1
eval_iters = 20
eval_only = False
keep_last_n = 0              # keep only the newest n ckpt_XXXXXX.pt (0 = keep all)
init_from = 'scratch'        # 'scratch' | 'resume' | path/to/ckpt.pt | 'hf:/local/hf/dir'
# wandb
wandb_log = False
wandb_project = 'nanosft'
wandb_run_name = None
# data
data_dir = 'data/my_sft'     # prepare_sft.py output dir, or a .jsonl file tokenized on the fly
tokenizer = 'qwen3'          # only used for .jsonl input
train_on = 'all'             # only used for .jsonl input (see tokenizer.encode_conversation)
chat_template = 'chatml'     # only used for .jsonl input
gradient_accumulation_steps = 4   # per process
batch_size = 4               # rows per micro-batch per process
block_size = 2048
packing = False              # False: pad to the longest row of the micro-batch; True: pack rows
seed = 1337
# model (init_from='scratch': a preset and/or explicit architecture keys)
model_preset = 'tiny'
n_layer = None
n_head = None
n_kv_head = None
n_embd = None
head_dim = None
intermediate_size = None
vocab_size = None
dropout = 0.0                # overrides the checkpoint's / HF model's dropout
# optimizer
learning_rate = 2e-5
max_iters = 3000
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # 0 disables clipping (the norm is still computed and logged)
max_nan_steps = 10           # abort after this many non-finite steps in a row
# learning rate schedule
decay_lr = True
warmup_iters = 100
lr_decay_iters = 3000
min_lr = 2e-6
# system
backend = ''                 # '' -> nccl on CUDA, gloo on CPU
parallel = 'ddp'             # under torchrun: 'ddp' (replicated model) | 'fsdp' (FSDP2: params, grads, optimizer state sharded)
device = ''                  # '' -> cuda if available else cpu
dtype = ''                   # '' -> bfloat16 on CUDA with bf16 support, float16 on other CUDA, float32 on CPU
compile = False
peak_flops = 0.0             # per GPU, for MFU; 0 -> guess from the device name
# -----------------------------------------------------------------------------

from sft_data import (DEFAULT_PAD_ID, IGNORE_INDEX, DataError, GlobalSampler, JsonlSplit,  # noqa: F401
                      SFTDataset, check_token_ids, eval_batches, open_split, pack_best_fit)
from model_builder import trained_positions  # noqa: E402


class TrainError(RuntimeError):
    """A user-facing problem found before or during training (bad data, mismatch, ...)."""


# -----------------------------------------------------------------------------
# Loss and checkpoint loading (the specification's three entry points)

def load_checkpoint(path, device='cpu', dropout=None):
    """checkpoint.load_checkpoint: rebuild ConfigurableGPT from ckpt['model_args'] -> (model, ckpt)."""
    from checkpoint import load_checkpoint as _load  # lazy: importing train_sft stays cheap
    return _load(path, device=device, dropout=dropout)


def compute_sft_loss(model, input_ids, labels, ignore_index=IGNORE_INDEX):
    """Mean cross-entropy over the trained tokens (labels aligned with input_ids, shifted inside)."""
    if ignore_index != IGNORE_INDEX:
        labels = labels.masked_fill(labels == ignore_index, IGNORE_INDEX)
    _, loss = model(input_ids, labels=labels)
    return loss


def count_trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Targets the model is trained on: labels are shifted inside, so position 0 never is one."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


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
        batch = {k: v.to(dev, non_blocking=True) for k, v in dict(batch, trained_index=index).items()}
        # DDP all-reduces (FSDP reduce-scatters) gradients only on the last micro-step.
        if fsdp:
            model.set_requires_gradient_sync(m == len(batches) - 1)
        with (model.no_sync() if ddp and not fsdp and m < len(batches) - 1 else nullcontext()):
            with autocast:
                _, loss_sum = model(batch['input_ids'], labels=batch['labels'],
                                    position_ids=batch.get('position_ids'), doc_ids=batch.get('doc_ids'),
                                    reduction='sum', trained_index=batch['trained_index'])
            # x world: DDP and FSDP average gradients over ranks, but the global count already normalized.
            loss = loss_sum.float() / denom * world
            (scaler.scale(loss) if scaler is not None else loss).backward()
        stats[0] += loss_sum.detach().double()
        stats[1] += len(index)
        stats[2] += batch['input_ids'].numel()
    return stats


def data_tokenizer(meta: dict) -> dict:
    """The tokenizer description of a data set (meta.json keeps it under 'tokenizer')."""
    tok = meta.get('tokenizer')
    tok = dict(tok) if isinstance(tok, dict) else {'name': tok}
    for key in ('hash', 'vocab_size', 'special_tokens', 'pad_id'):
        if tok.get(key) is None and meta.get(key) is not None:
            tok[key] = meta[key]
    tok.setdefault('special_tokens', {})
    return tok


def check_tokenizer_fits(tok: dict, model_vocab: int, ckpt_tokenizer: dict | None = None, where=''):
    """Every token id of the data must be a row of the model's embedding, else training is garbage."""
    data_vocab = tok.get('vocab_size')
    max_special = max((int(v) for v in tok['special_tokens'].values()), default=-1)
    if data_vocab is not None and int(data_vocab) > model_vocab:
        raise TrainError(f"{where}: tokenizer/model mismatch: the data's tokenizer {tok.get('name')!r} has "
                         f"{data_vocab} tokens but the model's vocab_size is {model_vocab}")
    if max_special >= model_vocab:
        raise TrainError(f"{where}: tokenizer/model mismatch: special token id {max_special} does not fit "
                         f"the model's vocab_size {model_vocab}")
    data_hash, ckpt_hash = tok.get('hash'), (ckpt_tokenizer or {}).get('hash')
    if data_hash and ckpt_hash and data_hash != ckpt_hash:
        raise TrainError(f"{where}: tokenizer mismatch: the data was tokenized with {tok.get('name')!r} "
                         f"(hash {data_hash[:12]}) but the checkpoint was trained on "
                         f"{ckpt_tokenizer.get('name')!r} (hash {ckpt_hash[:12]})")


# -----------------------------------------------------------------------------
# Helpers

def get_lr(it, cfg):
    if not cfg['decay_lr']:
        return cfg['learning_rate']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it > cfg['lr_decay_iters']:
        return cfg['min_lr']
    span = max(1, cfg['lr_decay_iters'] - cfg['warmup_iters'])
    ratio = (it - cfg['warmup_iters']) / span
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg['min_lr'] + coeff * (cfg['learning_rate'] - cfg['min_lr'])


def set_dropout(model, p: float):
    """Dropout is a training choice: override whatever the checkpoint/HF config had."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, 'dropout', None), float):
            m.dropout = p


def get_rng_state():
    # numpy's state as plain python values keeps the checkpoint loadable with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': (name, keys.tolist(), pos, has_gauss, cached),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def link_or_copy(src, dst):
    """ckpt.pt / ckpt_best.pt as hard links of the step checkpoint: no second multi-GB write."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def guess_peak_flops(device_type):
    if device_type != 'cuda':
        return 0.0
    name = torch.cuda.get_device_name()
    for key, flops in (('H200', 989e12), ('H100', 989e12), ('A100', 312e12), ('L40', 181e12),
                       ('A10', 125e12), ('4090', 165e12), ('3090', 71e12)):
        if key in name:
            return flops
    return 312e12


# -----------------------------------------------------------------------------
# The run

def optimizer_state_by_name(sd: dict, optimizer, model) -> dict:
    """An optimizer state dict keyed by parameter position (optimizer.state_dict(), older
    checkpoints) -> keyed by parameter name, the form torch.distributed.checkpoint uses."""
    if all(isinstance(p, str) for g in sd['param_groups'] for p in g['params']):
        return sd
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g['params']]
    return {'state': {names[i]: s for i, s in sd['state'].items()},
            'param_groups': [dict(g, params=[names[i] for i in g['params']]) for g in sd['param_groups']]}


def build_model(cfg, device):
    """-> (model, checkpoint dict or None)"""
    from model_builder import ConfigurableGPT
    from model_config import ModelArchitectureConfig
    init = cfg['init_from']
    ckpt = None
    if init == 'scratch':
        arch = ModelArchitectureConfig.from_preset(cfg['model_preset']).to_dict() if cfg['model_preset'] else {}
        for k in ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'head_dim', 'intermediate_size',
                  'vocab_size'):
            if cfg[k] is not None:
                arch[k] = cfg[k]
        arch['block_size'] = cfg['block_size']
        arch['dropout'] = cfg['dropout']
        try:
            mconf = ModelArchitectureConfig.from_dict(arch)
            mconf.validate()
        except (TypeError, ValueError) as e:
            raise TrainError(f"init_from='scratch': bad model config: {e}") from e
        model = ConfigurableGPT(mconf)
    elif init.startswith('hf:'):
        path = init[3:]
        if not os.path.isdir(path):
            raise TrainError(f"init_from={init}: directory not found: {path}")
        try:
            model = ConfigurableGPT.from_hf(path)
        except (OSError, ValueError) as e:
            raise TrainError(f"init_from={init}: {e}") from e
    else:
        path = os.path.join(cfg['out_dir'], 'ckpt.pt') if init == 'resume' else init
        if not os.path.isfile(path):
            raise TrainError(f"init_from={init}: checkpoint not found: {path}")
        try:
            model, ckpt = load_checkpoint(path, device='cpu', dropout=cfg['dropout'])
        except ValueError as e:   # CheckpointError: missing / truncated / foreign file
            raise TrainError(f"init_from={init}: {e}") from e
    set_dropout(model, cfg['dropout'])
    if cfg['block_size'] > model.config.block_size:
        raise TrainError(f"block_size={cfg['block_size']} is larger than the model's block_size "
                         f"{model.config.block_size}")
    return model.to(device), ckpt


def train(cfg: dict) -> dict:
    """Run the training described by the resolved config; returns the run summary."""
    # ---- distributed / device setup
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev = cfg['device'] or ('cuda' if torch.cuda.is_available() else 'cpu')
    if ddp:
        backend = cfg['backend'] or ('nccl' if dev.startswith('cuda') else 'gloo')
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        rank, local_rank, world = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
        if dev.startswith('cuda'):
            dev = f'cuda:{local_rank}'
            torch.cuda.set_device(dev)
    else:
        rank, world = 0, 1
    master = rank == 0
    if cfg['parallel'] not in ('ddp', 'fsdp'):
        raise TrainError(f"parallel={cfg['parallel']!r}: expected 'ddp' or 'fsdp'")
    fsdp = ddp and cfg['parallel'] == 'fsdp'   # one process: nothing to shard, plain training
    device_type = 'cuda' if dev.startswith('cuda') else 'cpu'
    dtype_name = cfg['dtype'] or ('float32' if device_type == 'cpu' else
                                  'bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
    dtype_name = {'bf16': 'bfloat16', 'fp16': 'float16', 'fp32': 'float32'}.get(dtype_name, dtype_name)
    if dtype_name not in ('float32', 'bfloat16', 'float16'):
        raise TrainError(f"dtype={cfg['dtype']!r}: expected float32, bfloat16 or float16")
    if fsdp and dtype_name == 'float16':
        raise TrainError("parallel='fsdp' trains in float32 or bfloat16 (float16 needs a sharded grad scaler)")
    ptdtype = getattr(torch, dtype_name)
    autocast = nullcontext() if device_type == 'cpu' or dtype_name == 'float32' else \
        torch.autocast(device_type=device_type, dtype=ptdtype)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def print0(*a):
        if master:
            print(*a, flush=True)

    def all_reduce(t, op=dist.ReduceOp.SUM):
        if ddp:
            dist.all_reduce(t, op=op)
        return t

    G = world * cfg['gradient_accumulation_steps'] * cfg['batch_size']
    print0("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in cfg.items()))
    print0(f"world_size={world} global batch={G} rows "
           f"({world} x {cfg['gradient_accumulation_steps']} accum x {cfg['batch_size']} rows)")

    # ---- data (before the model: a bad data dir fails fast)
    train_split = open_split(cfg['data_dir'], 'train', cfg)
    val_split = open_split(cfg['data_dir'], 'val', cfg)
    tok_info = data_tokenizer(getattr(train_split, 'meta', None) or {})
    pad_id = int(tok_info.get('pad_id') if tok_info.get('pad_id') is not None else DEFAULT_PAD_ID)
    train_ds = SFTDataset(train_split, cfg['block_size'], cfg['packing'], pad_id, cfg['seed'])
    val_ds = SFTDataset(val_split, cfg['block_size'], cfg['packing'], pad_id, cfg['seed'], shuffle=False)
    sampler = GlobalSampler(train_ds)
    print0(f"data: {len(train_ds)} train / {len(val_ds)} val examples from {cfg['data_dir']}")

    # ---- model
    random.seed(cfg['seed'] + rank)
    np.random.seed(cfg['seed'] + rank)
    torch.manual_seed(cfg['seed'] + rank)
    model, ckpt = build_model(cfg, dev)
    check_tokenizer_fits(tok_info, model.config.vocab_size, (ckpt or {}).get('tokenizer'), where=cfg['data_dir'])
    for name, split in (('train', train_split), ('val', val_split)):
        shard = cfg['data_dir'] if cfg['data_dir'].endswith('.jsonl') else os.path.join(cfg['data_dir'], f'{name}.bin')
        check_token_ids(split, model.config.vocab_size, shard)
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, init_from={cfg['init_from']}")

    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32) \
            if device_type == 'cuda' and dtype_name != 'float32' else MixedPrecisionPolicy()
        # DDP broadcasts rank 0's weights at wrap time, FSDP does not: ranks seeded differently would
        # each keep a shard of their own random init.
        for v in model.state_dict().values():
            dist.broadcast(v, src=0)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                           (cfg['beta1'], cfg['beta2']), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype_name == 'float16'))
    iter_num, best_val_loss, resumed_at = 0, float('inf'), None
    if cfg['init_from'] == 'resume':
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        # Keyed by parameter name, so one process, DDP and FSDP resume each other's checkpoints;
        # under FSDP every rank read the whole file and keeps its own shard of it.
        set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(ckpt['optimizer'], optimizer, model),
                                 options=StateDictOptions(full_state_dict=fsdp))
        if 'scaler' in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        iter_num, best_val_loss = ckpt['iter_num'], ckpt.get('best_val_loss', float('inf'))
        # Skip the eval at the resume point only if it already ran (not after a signal stop).
        resumed_at = iter_num if ckpt.get('evaluated', True) else None
        ds = ckpt.get('data_state') or {}
        sampler.epoch, sampler.position = ds.get('epoch', 0), ds.get('position', 0)
        rngs = ckpt.get('rng')
        if isinstance(rngs, list) and len(rngs) == world:
            set_rng_state(rngs[rank])
        elif rngs:
            print0(f"warning: checkpoint has RNG states for {len(rngs)} ranks, this run has {world}: "
                   f"dropout noise will differ from an uninterrupted run")
        if ds.get('global_batch') not in (None, G):
            print0(f"warning: global batch changed from {ds['global_batch']} to {G} rows on resume")
        print0(f"resumed from iter {iter_num} (epoch {sampler.epoch}, position {sampler.position})")
    ckpt = None  # free the checkpoint's tensors

    raw_model = model
    if cfg['compile']:
        model = torch.compile(model)
    if ddp and not fsdp:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)

    # ---- outputs: an out_dir we cannot write must fail now, not at the first checkpoint hours later
    if master:
        try:
            os.makedirs(cfg['out_dir'], exist_ok=True)
            with tempfile.TemporaryFile(dir=cfg['out_dir']):
                pass
        except OSError as e:
            raise TrainError(f"out_dir {cfg['out_dir']}: cannot write there ({e.strerror or e})") from e
    stamp = datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S')
    run_path = os.path.join(cfg['out_dir'], f'run_{stamp}.json')
    for n in range(1, 100):   # a quick resume must not overwrite the previous run's log
        if not os.path.exists(run_path):
            break
        run_path = os.path.join(cfg['out_dir'], f'run_{stamp}_{n}.json')
    run_log = {'config': cfg, 'iters': [], 'evals': [], 'summary': {}}
    wandb_run = None
    if cfg['wandb_log'] and master:
        try:
            import wandb
            wandb_run = wandb.init(project=cfg['wandb_project'], name=cfg['wandb_run_name'], config=cfg)
        except ImportError:
            print0("warning: wandb_log=True but wandb is not installed; logging to run_*.json only")

    stop_requested = [False]

    def on_signal(signum, frame):
        stop_requested[0] = True
        print(f"[rank {rank}] got signal {signum}: finishing this step, then saving ckpt.pt", flush=True)

    in_main_thread = threading.current_thread() is threading.main_thread()
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if in_main_thread else {}

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for name, ds, units in (('train', train_ds, train_ds.units(0)), ('val', val_ds, val_ds.units(0))):
            acc = torch.zeros(2, dtype=torch.float64, device=dev)
            if len(units):
                for batch in eval_batches(ds, units, cfg['eval_iters'], world, rank, cfg['batch_size']):
                    batch = {k: v.to(dev) for k, v in batch.items()}
                    with autocast:
                        _, loss = model(batch['input_ids'], labels=batch['labels'],
                                        position_ids=batch.get('position_ids'), doc_ids=batch.get('doc_ids'),
                                        reduction='sum')
                    acc[0] += loss.double()
                    acc[1] += count_trained_tokens(batch['labels'])
            all_reduce(acc)
            out[name] = (acc[0] / acc[1]).item() if acc[1] > 0 else float('nan')
        model.train()
        return out

    def save(iter_num, best_val_loss, is_best, step_file):
        # Every rank's RNG state goes in (gathered: a collective all ranks run), so resume is exact.
        rng = get_rng_state()
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        # The optimizer state is keyed by parameter name either way (see the resume above).
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        if fsdp:
            # Gathering the full state is a collective: every rank runs it, rank 0 gets the tensors.
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(raw_model, options=opts)
            optim_sd = get_optimizer_state_dict(raw_model, optimizer, options=opts)
        if not master:
            return
        if not fsdp:
            model_sd, optim_sd = raw_model.state_dict(), get_optimizer_state_dict(raw_model, optimizer)
        checkpoint = {'model': model_sd, 'model_args': raw_model.config.to_dict(),
                      'optimizer': optim_sd, 'iter_num': iter_num,
                      'best_val_loss': best_val_loss, 'config': cfg, 'rng': rngs,
                      'data_state': {**sampler.state_dict(), 'global_batch': G, 'seed': cfg['seed']},
                      'tokenizer': tok_info, 'evaluated': step_file, 'format_version': 1}
        if scaler.is_enabled():
            checkpoint['scaler'] = scaler.state_dict()
        latest = os.path.join(cfg['out_dir'], 'ckpt.pt')
        from checkpoint import save_checkpoint
        path = os.path.join(cfg['out_dir'], f'ckpt_{iter_num:06d}.pt') if step_file else latest
        try:
            save_checkpoint(path, checkpoint)
            if step_file:
                link_or_copy(path, latest)
                if cfg['keep_last_n'] > 0:
                    steps = sorted(f for f in os.listdir(cfg['out_dir'])
                                   if f.startswith('ckpt_') and f[5:11].isdigit() and f.endswith('.pt'))
                    for old in steps[:-cfg['keep_last_n']]:
                        os.remove(os.path.join(cfg['out_dir'], old))
            if is_best:
                link_or_copy(latest, os.path.join(cfg['out_dir'], 'ckpt_best.pt'))
        except OSError as e:   # disk full, quota, out_dir removed: writes are atomic, nothing is half-done
            raise TrainError(f"cannot save {path} at iter {iter_num}: {e.strerror or e}; {latest} is "
                             f"the last complete checkpoint") from e
        print0(f"saved {'ckpt_%06d.pt + ' % iter_num if step_file else ''}ckpt.pt"
               f"{' + ckpt_best.pt' if is_best else ''} at iter {iter_num}")

    # ---- the loop
    flops_per_token = raw_model.config.flops_per_token(cfg['block_size'])
    peak = cfg['peak_flops'] or guess_peak_flops(device_type)
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    bar = None
    if master:
        from tqdm import tqdm
        bar = tqdm(total=cfg['max_iters'], initial=iter_num, dynamic_ncols=True, desc='sft')
    A, B = cfg['gradient_accumulation_steps'], cfg['batch_size']
    nan_streak, skipped = 0, 0
    # (loss sum, trained tokens, all tokens) summed on device since the last log line: no per-step sync
    acc = torch.zeros(3, dtype=torch.float64, device=dev)
    t_log, last_val, last_loss = time.time(), None, None
    t_start = time.time()
    try:
        while True:
            at_end = iter_num >= cfg['max_iters']
            if (iter_num % cfg['eval_interval'] == 0 and iter_num != resumed_at) or at_end or cfg['eval_only']:
                losses = estimate_loss()
                last_val = losses['val']
                print0(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                run_log['evals'].append({'iter': iter_num, 'train_loss': losses['train'],
                                         'val_loss': losses['val']})
                if wandb_run:
                    wandb_run.log({'iter': iter_num, 'train/eval_loss': losses['train'],
                                   'val/loss': losses['val']})
                if cfg['eval_only']:
                    break
                # Iteration 0 is saved only by a 0-step run: the starting model as a checkpoint (an HF
                # import, or the demo's untrained base model to compare against).
                if (iter_num > 0 or at_end) and iter_num != resumed_at:
                    is_best = math.isfinite(losses['val']) and losses['val'] < best_val_loss
                    if is_best:
                        best_val_loss = losses['val']
                    save(iter_num, best_val_loss, is_best, step_file=True)
                if master:
                    write_json_atomic(run_path, run_log)
            if at_end:
                break

            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr

            batches = [train_ds.collate(units) for units in sampler.next_step(world, rank, A, B)]
            step_stats = forward_backward(model, batches, dev, world, ddp, autocast, scaler, all_reduce, fsdp)

            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg['grad_clip'] if cfg['grad_clip'] > 0 else float('inf'))
            if hasattr(grad_norm, 'full_tensor'):   # FSDP: a DTensor reduced over the shards; the global norm
                grad_norm = grad_norm.full_tensor()
            # One host sync per step: the grad norm is identical on all ranks (grads are all-reduced),
            # so every rank takes the same skip/stop decision.
            # Flags agreed on at the step boundary (MAX over ranks): a signal seen by any rank stops all;
            # a non-finite loss on any rank makes the step a NaN step. Under fp16 a non-finite grad norm
            # with a finite loss is an overflow: the scaler skips that step and lowers its scale.
            flags = all_reduce(torch.stack([torch.tensor(float(stop_requested[0]), device=dev),
                                            (~torch.isfinite(step_stats[0])).float()]), dist.ReduceOp.MAX)
            gn = grad_norm.item()
            stop_now, bad_loss = (f > 0 for f in flags.tolist())
            if not math.isfinite(gn) and (bad_loss or not scaler.is_enabled()):
                nan_streak += 1
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                scaler.update()   # fp16: closes this step's unscale_ (a no-op without a scaler)
                print0(f"iter {iter_num}: non-finite grad norm ({gn}); skipping this step "
                       f"({nan_streak} in a row, max_nan_steps={cfg['max_nan_steps']})")
                if nan_streak >= cfg['max_nan_steps']:
                    raise TrainError(f"aborting: {nan_streak} non-finite steps in a row (iter {iter_num}); "
                                     f"lower learning_rate, check the data, or use bf16/fp32")
            else:
                nan_streak = 0
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                acc += step_stats   # a skipped NaN step stays out of the logged loss
            iter_num += 1
            if bar:
                bar.update(1)

            if iter_num % cfg['log_interval'] == 0 or stop_now or iter_num >= cfg['max_iters']:
                stats = all_reduce(acc.clone())
                dt = time.time() - t_log
                trained, total = stats[1].item(), stats[2].item()
                last_loss = stats[0].item() / max(trained, 1.0)
                tps_trained, tps_total = trained / dt, total / dt
                line = (f"iter {iter_num}: loss {last_loss:.4f}, lr {lr:.3e}, grad norm {gn:.3f}, "
                        f"tok/s {tps_trained:,.0f} trained / {tps_total:,.0f} total")
                if device_type == 'cuda':
                    mfu = flops_per_token * tps_total / world / peak if peak else 0.0
                    line += (f", mfu {100 * mfu:.1f}%, "
                             f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
                if master:
                    (bar.write if bar else print)(line)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                run_log['iters'].append({'iter': iter_num, 'loss': last_loss, 'lr': lr, 'grad_norm': gn,
                                         'tokens': int(total), 'trained_tokens': int(trained),
                                         'tok_per_s': tps_total, 'time': time.time() - t_start})
                if wandb_run:
                    wandb_run.log({'iter': iter_num, 'train/loss': last_loss, 'lr': lr,
                                   'grad_norm': gn, 'tok_per_s': tps_total})
                acc.zero_()
                t_log = time.time()

            if stop_now and iter_num < cfg['max_iters']:
                print0(f"stop requested: saving ckpt.pt at iter {iter_num} and exiting")
                save(iter_num, best_val_loss, False, step_file=False)
                break
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if bar:
            bar.close()

    summary = {'iters': iter_num, 'best_val_loss': best_val_loss if math.isfinite(best_val_loss) else None,
               'last_val_loss': last_val, 'last_train_loss': last_loss, 'skipped_steps': skipped,
               'truncated_examples': train_ds.truncated, 'world_size': world,
               'wall_time_s': time.time() - t_start, 'stopped_early': iter_num < cfg['max_iters']}
    run_log['summary'] = summary
    if master:
        write_json_atomic(run_path, run_log)
        if train_ds.truncated:
            print0(f"note: {train_ds.truncated} training examples were longer than block_size "
                   f"{cfg['block_size']} and were truncated")
    if wandb_run:
        wandb_run.finish()
    return summary


DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and k.islower() and isinstance(v, (int, float, bool, str, type(None)))}


def main(argv=None):
    from configurator import ConfigError, configure
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print("usage: [torchrun ...] train_sft.py [config.py ...] [--key=value ...]\nkeys and defaults:\n"
              + "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
        return
    try:
        cfg = configure(DEFAULTS, argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    try:
        train(cfg)
    except (TrainError, DataError) as e:
        raise SystemExit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
