"""Checkpoints: one torch.save dict that rebuilds its model from `model_args` alone, and the
training state around it.

A LoRA checkpoint holds the trained tensors only ('model': adapters, DoRA magnitudes, embeddings
trained in full), plus 'lora' (lora.LoRAConfig.to_dict()) and 'base': where the frozen base came from
('hf:/dir' or a checkpoint path) and its sha256 (lora.base_fingerprint). load_checkpoint rebuilds
the base from there (or from `base=` when it moved), checks the hash, adds the adapters.

Keys: 'model' (clean state dict), 'model_args' (ModelArchitectureConfig.to_dict()), 'optimizer'
(keyed by parameter name), 'iter_num', 'best_val_loss', 'config', 'rng' (one state per rank),
'data_state' (the sampler's cursor), 'tokenizer', 'evaluated', 'format_version' (+ 'scaler' under
fp16). Keep every value tensors / numbers / strings / lists / dicts: then plain `torch.load(path)`
(weights_only=True, the torch default) reads it, as the SFT spec's loading snippet does.

    save_training_state(...)      every rank calls it (a collective); rank 0 writes ckpt_XXXXXX.pt,
                                  ckpt.pt (a hard link), ckpt_best.pt, and rotates old step files
    restore_training_state(...)   optimizer, grad scaler, sampler cursor, RNG states -> iter_num

With sharded=True (the default under FSDP) a checkpoint is a directory instead, each rank writing its
own shard with torch.distributed.checkpoint: see "Sharded checkpoints" at the end of this file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import random
import re
import secrets
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lora import (LoRAConfig, LoRAError, adapter_state_dict, apply_lora, base_fingerprint,
                  load_adapter_state_dict, merge_lora, quantizer_version, trainable_names)
from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig
from progress import say

FORMAT_VERSION = 1
_PREFIXES = ('_orig_mod.', 'module.')   # torch.compile and DDP wrappers


class CheckpointError(ValueError):
    pass


def save_checkpoint(path, checkpoint: dict) -> None:
    """torch.save to a temp file in the same directory, fsync, then os.replace: a crash leaves the
    old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = dict(checkpoint)
    checkpoint.setdefault('format_version', FORMAT_VERSION)
    if 'model' in checkpoint:
        checkpoint['model'] = clean_state_dict(checkpoint['model'])
    _remove_stale_temps(path.parent)
    # Not mkstemp: it makes the file 0600 whatever the umask, and a serving container or another user
    # could not read the checkpoint. 'xb' creates it with the modes the user's umask gives.
    tmp = path.parent / f'.{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
    try:
        with open(tmp, 'xb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)   # make the rename itself durable


def _remove_stale_temps(folder: Path, pattern: str = '.*.pt.*.*.tmp') -> None:
    """Delete the temp files (or directories) of saves whose process is gone (killed mid-write): they
    are never read, but each is checkpoint-sized, so a few kills during saves would otherwise fill the
    disk. Their names end in .{pid}.{random}.tmp."""
    for p in folder.glob(pattern):
        pid = p.name[:-len('.tmp')].rsplit('.', 2)[-2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:   # a file, a directory, or the new ckpt_best.pt link of _point
            if p.is_symlink() or not p.is_dir():
                p.unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:   # alive under another user: not ours to delete
            pass


def clean_state_dict(sd) -> dict:
    """Strip the '_orig_mod.' (torch.compile) and 'module.' (DDP) prefixes, in any nesting."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
            # compile inside DDP (or the reverse) can also leave the marker mid-key
            if '._orig_mod.' in key or '.module.' in key:
                key, changed = key.replace('._orig_mod.', '.').replace('.module.', '.'), True
        out[key] = value
    return out


def _torch_load(path: Path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if 'weights_only' not in str(e) and 'Weights only' not in str(e):
            raise
    # a checkpoint of ours holding a non-allowlisted object (e.g. a numpy RNG state): it is a
    # local file the user points us at, so full unpickling is acceptable
    return torch.load(path, map_location=device, weights_only=False, mmap=True)


def verify_checkpoint(path) -> None:
    """Check every entry of the checkpoint (a zip archive) against the CRC-32 torch.save stored for it.
    torch.load(mmap=True) does not, so a flipped or zeroed byte inside a tensor would load silently.
    It reads the whole file once (about 0.5 s per GB from the page cache on a 2-core VM; the load that
    follows then finds the file cached)."""
    name = None
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = info.filename
                with zf.open(info) as f:   # ZipExtFile checks the CRC when it reaches the end
                    while f.read(1 << 24):
                        pass
    except zipfile.BadZipFile as e:
        where = f" (entry {name!r})" if name else ''
        raise CheckpointError(f"{path}: damaged checkpoint{where}: {e}; {_older_checkpoints_hint(path)}") from e
    except (OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: damaged or unreadable checkpoint: {type(e).__name__}: {e}; "
                              f"{_older_checkpoints_hint(path)}") from e


def _older_checkpoints_hint(path) -> str:
    path = Path(path)
    steps = sorted(p.name for p in path.parent.glob('ckpt_[0-9]*.pt') if p.name != path.name)
    if not steps:
        return 'no older ckpt_XXXXXX.pt beside it to fall back to'
    return (f"fall back to an older step checkpoint, e.g. `cp {path.parent / steps[-1]} "
            f"{path.parent / 'ckpt.pt'}` then init_from='resume' (older ones: {', '.join(steps[-4:])})")


def read_checkpoint(path, device='cpu', verify: bool = True) -> dict:
    """Load and sanity-check a checkpoint dict (verify: every byte against its CRC first); every
    failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if verify and zipfile.is_zipfile(path):
        verify_checkpoint(path)
    try:
        ckpt = _torch_load(path, device)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt or 'model' not in ckpt:
        what = f"dict with keys {sorted(map(str, ckpt))[:10]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a nanoSFT/nanoGPT checkpoint (needs 'model' and "
                              f"'model_args'; found {what})")
    # nanoGPT checkpoints carry no version: they are read as version 1
    if ckpt.get('format_version', FORMAT_VERSION) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {ckpt['format_version']!r}, this nanoSFT "
                              f"reads version {FORMAT_VERSION}")
    return ckpt


def check_device(device: str) -> None:
    """A --device string checked before anything is loaded: torch refuses a bad one only when the
    first tensor moves there (after the loading), with a traceback. ValueError naming the string."""
    kind, colon, index = device.partition(':')
    if kind not in ('cpu', 'cuda', 'mps') or (colon and not (kind == 'cuda' and index.isdigit())):
        raise ValueError(f'device={device!r}: expected cpu, cuda, cuda:N, mps')
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device={device!r}: CUDA is not available here')
    if kind == 'cuda' and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f'device={device!r}: there are {torch.cuda.device_count()} CUDA devices here '
                         f'(cuda:0 to cuda:{torch.cuda.device_count() - 1})')
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f'device={device!r}: MPS is not available here')


def load_checkpoint(path, device='cpu', dropout=None, verify: bool = True, base: str | None = None,
                    lora_overrides: dict | None = None) -> tuple[ConfigurableGPT, dict]:
    """Rebuild the model from ckpt['model_args'] and load ckpt['model'] -> (model, ckpt), after
    checking the file's bytes (verify_checkpoint). dropout overrides the saved value (e.g. 0.0 for
    evaluation, or a new value for fine-tuning). A directory (or ckpt.pt linking to one) is a sharded
    checkpoint, read here in one process. A LoRA checkpoint gives its base with the adapters: the
    base from `base` if given (it moved), else from where training found it, checked against the
    recorded hash; lora_overrides replaces LoRAConfig fields (e.g. dropout, quantize)."""
    if os.path.isdir(path):
        return load_sharded_checkpoint(path, device, dropout, verify=verify)
    ckpt = read_checkpoint(path, device='cpu', verify=verify)
    config = _architecture(ckpt, path, dropout)
    sd = clean_state_dict(ckpt['model'])
    if ckpt.get('lora') is not None:
        try:
            cfg = LoRAConfig.from_dict(ckpt['lora'])
            cfg = dataclasses.replace(cfg, **(lora_overrides or {}))
        except (LoRAError, TypeError) as e:
            raise CheckpointError(f"{path}: bad LoRA config: {e}") from e
        recorded = ckpt.get('base') or {}
        model, _ = lora_model(base or recorded.get('source'), cfg, adapters=sd, expected=recorded,
                              device=device, dropout=dropout, where=str(path))
        if model.config.to_dict() != {**config.to_dict(), 'dropout': model.config.dropout}:
            raise CheckpointError(f"{path}: the base's architecture differs from the checkpoint's model_args")
        ckpt['model_args'] = model.config.to_dict()
        return model, ckpt
    # nanoGPT's non-flash path saves its causal-mask buffer as '<block>.attn.bias'
    sd = {k: v for k, v in sd.items() if not (k.endswith('.attn.bias') and v.dim() == 4)}
    if config.tie_word_embeddings and 'lm_head.weight' not in sd and 'transformer.wte.weight' in sd:
        sd['lm_head.weight'] = sd['transformer.wte.weight']
    with torch.device('meta'):
        model = ConfigurableGPT(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model_args: {e}") from e
    model.tie_weights()
    ckpt['model_args'] = config.to_dict()
    return model.to(device), ckpt


# ----------------------------------------------------------------------------------------------
# LoRA: a frozen base (from a Hugging Face directory or a checkpoint) and adapters

def load_base(source: str | None, dropout=None) -> ConfigurableGPT:
    """The base model of a LoRA run: 'hf:/dir' (a local Hugging Face directory) or a checkpoint path
    (a LoRA checkpoint there means its merged model: adapters stack on a merged LoRA)."""
    if not source:
        raise CheckpointError("no base model given for the LoRA adapters (lora_base= / --base: "
                              "'hf:/local/hf/dir' or a checkpoint path)")
    if source.startswith('hf:'):
        from hf_interop import from_hf
        if not os.path.isdir(source[3:]):
            raise CheckpointError(f"base {source}: directory not found")
        try:
            return from_hf(source[3:], dtype=None)   # as stored: apply_lora sets each weight's dtype
        except (OSError, ValueError) as e:
            raise CheckpointError(f"base {source}: {e}") from e
    if not os.path.isfile(source):
        raise CheckpointError(f"base {source}: not found (moved? give its new place: lora_base= / --base)")
    model, _ = load_checkpoint(source, dropout=dropout)
    return merge_lora(model) if getattr(model, 'lora_config', None) is not None else model


def base_source(init: str) -> str:
    """How a LoRA checkpoint names its base: an absolute path, so a run started elsewhere finds it."""
    if init.startswith('hf:'):
        return 'hf:' + os.path.abspath(init[3:])
    return os.path.abspath(init)


def lora_model(source: str | None, cfg: LoRAConfig, *, adapters: dict | None = None,
               peft: bool = False, expected: dict | None = None, device='cpu', dropout=None,
               seed: int = 0, where: str = 'adapter', log=None) -> tuple[ConfigurableGPT, dict]:
    """The base from `source` with the adapters of cfg -> (model, base record). adapters: trained
    tensors to load (our names, or PEFT's when peft=True); expected: the base record they were
    trained on (a different base is an error naming both)."""
    log = log or (lambda m: say(m, file=sys.stderr))
    base = load_base(source, dropout)
    record = {'source': source, **base_fingerprint(base)}
    if cfg.quantize:
        record['quantizer'] = quantizer_version()
    if expected:
        check_same_base(expected, record, where, log)
    try:
        apply_lora(base, cfg, seed=seed, device=device)
        if adapters is not None:
            if peft:
                from lora import load_peft_tensors
                load_peft_tensors(base, adapters, where)
            else:
                load_adapter_state_dict(base, adapters, where)
    except LoRAError as e:
        raise CheckpointError(str(e)) from e
    return base.to(device), record


def check_same_base(expected: dict, found: dict, where: str, log=print) -> None:
    if expected.get('sha256') and expected['sha256'] != found['sha256']:
        raise CheckpointError(
            f"{where}: the adapters were trained on the base {expected.get('source')} (sha256 "
            f"{expected['sha256'][:16]}), but {found['source']} is a different base (sha256 "
            f"{found['sha256'][:16]}); give the base they were trained on (lora_base= / --base)")
    if expected.get('quantizer') and found.get('quantizer') and expected['quantizer'] != found['quantizer']:
        log(f"warning: {where} was trained on a base quantized by {expected['quantizer']}, this one by "
            f"{found['quantizer']}: if its NF4 rounding changed, outputs differ slightly from training")


# ----------------------------------------------------------------------------------------------
# Training state: what exact resume needs beyond the weights

def get_rng_state() -> dict:
    # numpy's state as plain python values keeps the checkpoint loadable with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': (name, keys.tolist(), pos, has_gauss, cached),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state['python'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def optimizer_state_by_name(sd: dict, optimizer, model) -> dict:
    """An optimizer state dict keyed by parameter position (optimizer.state_dict(), older
    checkpoints) -> keyed by parameter name, the form torch.distributed.checkpoint uses."""
    if all(isinstance(p, str) for g in sd['param_groups'] for p in g['params']):
        return sd
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g['params']]
    return {'state': {names[i]: s for i, s in sd['state'].items()},
            'param_groups': [dict(g, params=[names[i] for i in g['params']]) for g in sd['param_groups']]}


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def link_or_copy(src, dst) -> None:
    """ckpt.pt / ckpt_best.pt as hard links of the step checkpoint: no second multi-GB write."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_training_state(out_dir, model, optimizer, *, iter_num: int, best_val_loss: float,
                        step_file: bool, is_best: bool = False, keep_last_n: int = 0,
                        fsdp: bool = False, sharded: bool = False, extra: dict | None = None) -> str | None:
    """Everything exact resume needs, from every rank. A collective under torchrun: every rank calls
    it (RNG states are gathered; under FSDP the full state is gathered to rank 0), rank 0 writes.
    step_file=True (an evaluation step): ckpt_{iter:06d}.pt, ckpt.pt as a link to it, ckpt_best.pt
    when is_best, and only the newest keep_last_n step files kept (0 = all); step_file=False (a
    stop between evaluations): ckpt.pt alone. `extra` adds keys (config, data_state, tokenizer...).
    sharded=True: a checkpoint directory that every rank writes its own part of, nothing gathered
    (save_sharded_training_state). Returns the line to log on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    rank, world = _rank_world()
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, get_rng_state())
    else:
        rngs = [get_rng_state()]
    meta = {'model_args': model.config.to_dict(), 'iter_num': iter_num, 'best_val_loss': best_val_loss,
            'rng': rngs, 'evaluated': step_file, 'format_version': FORMAT_VERSION, **(extra or {})}
    if sharded:
        return save_sharded_training_state(out_dir, model, optimizer, meta, step_file=step_file,
                                           is_best=is_best, keep_last_n=keep_last_n)
    # The optimizer state is keyed by parameter name, so one process, DDP and FSDP resume each other's.
    # A LoRA model saves its trained tensors only: the frozen base is named by extra['base'].
    lora = getattr(model, 'lora_config', None) is not None
    if fsdp:   # gathering the full state is a collective: every rank runs it, rank 0 gets the tensors
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
        model_sd = get_model_state_dict(model, options=opts)
        if lora:   # a frozen weight tied to another name can still come along: keep the trained ones
            model_sd = {k: v for k, v in model_sd.items() if k in set(trainable_names(model))}
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if rank != 0:
        return None
    if not fsdp:
        model_sd = adapter_state_dict(model) if lora else model.state_dict()
        optim_sd = get_optimizer_state_dict(model, optimizer)
    checkpoint = {'model': model_sd, 'optimizer': optim_sd, **meta}
    if lora:
        checkpoint['lora'] = model.lora_config.to_dict()
    latest = os.path.join(out_dir, 'ckpt.pt')
    path = os.path.join(out_dir, f'ckpt_{iter_num:06d}.pt') if step_file else latest
    try:
        save_checkpoint(path, checkpoint)
        if step_file:
            link_or_copy(path, latest)
            if keep_last_n > 0:
                steps = sorted(f for f in os.listdir(out_dir)
                               if f.startswith('ckpt_') and f[5:11].isdigit() and f.endswith('.pt'))
                for old in steps[:-keep_last_n]:
                    os.remove(os.path.join(out_dir, old))
        if is_best:
            link_or_copy(latest, os.path.join(out_dir, 'ckpt_best.pt'))
    except OSError as e:   # disk full, quota, out_dir removed: writes are atomic, nothing is half-done
        raise CheckpointError(f"cannot save {path} at iter {iter_num}: {e.strerror or e}; {latest} is "
                              f"the last complete checkpoint") from e
    return (f"saved {'ckpt_%06d.pt + ' % iter_num if step_file else ''}ckpt.pt"
            f"{' + ckpt_best.pt' if is_best else ''} at iter {iter_num}")


def restore_training_state(ckpt: dict, model, optimizer, *, scaler=None, sampler=None,
                           fsdp: bool = False, global_batch: int | None = None,
                           log=print) -> tuple[int, float, int | None]:
    """Put the optimizer, grad scaler, sampler cursor and this rank's RNG state of `ckpt` back
    (the model weights were loaded with the checkpoint). Under FSDP every rank read the whole file
    and keeps its own shard. A sharded checkpoint (open_sharded_checkpoint) brings the model weights
    and the optimizer state here, each rank reading the part it holds. -> (iter_num, best_val_loss,
    resumed_at): resumed_at is the iteration whose evaluation already ran (None after a stop between
    evaluations, so it runs again)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    rank, world = _rank_world()
    if 'dcp_dir' in ckpt:
        load_sharded_training_state(ckpt, model, optimizer)
    else:
        set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(ckpt['optimizer'], optimizer, model),
                                 options=StateDictOptions(full_state_dict=fsdp))
    if 'scaler' in ckpt and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(ckpt['scaler'])
    iter_num, best_val_loss = ckpt['iter_num'], ckpt.get('best_val_loss', float('inf'))
    resumed_at = iter_num if ckpt.get('evaluated', True) else None
    ds = ckpt.get('data_state') or {}
    if sampler is not None:
        sampler.epoch, sampler.position = ds.get('epoch', 0), ds.get('position', 0)
    rngs = ckpt.get('rng')
    if isinstance(rngs, list) and len(rngs) == world:
        set_rng_state(rngs[rank])
    elif rngs:
        log(f"warning: checkpoint has RNG states for {len(rngs)} ranks, this run has {world}: "
            f"dropout noise will differ from an uninterrupted run")
    if ds.get('global_batch') not in (None, global_batch):
        log(f"warning: global batch changed from {ds['global_batch']} to {global_batch} rows on resume")
    log(f"resumed from iter {iter_num} (epoch {ds.get('epoch', 0)}, position {ds.get('position', 0)})")
    return iter_num, best_val_loss, resumed_at


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): every rank writes its own shard with torch.distributed.checkpoint
# (DCP), so an 8B model's ~128 GB of fp32 weights and AdamW state never pass through one host.
#
#   out_dir/ckpt_000200/        .metadata + __<rank>_0.distcp: DCP's files, {'model': state dict,
#                               'optimizer': state by parameter name}, each rank's shard in its own
#                               file; meta.pt: every other key of the one-file format (model_args,
#                               config, tokenizer, iter_num, best_val_loss, data_state, every rank's
#                               RNG state, evaluated, format_version, shard_sha256:
#                               every DCP file's digest, checked on load)
#   out_dir/ckpt_000213_stop/   a stop between evaluations (SIGTERM); deleted once nothing points at it
#   out_dir/ckpt.pt -> ckpt_000200        the latest: a relative symlink, swapped with os.replace
#   out_dir/ckpt_best.pt -> ckpt_000200   the best val loss (keep_last_n never deletes its target)
#
# A directory is written as .ckpt_000200.<pid>.<hex>.tmp/ and renamed by rank 0 when complete: DCP
# writes .metadata on rank 0 only after every rank has reported its file written and fsynced. A kill
# at any moment leaves ckpt.pt pointing at the previous complete directory. DCP reshards on load, so
# a checkpoint resumes on any world size, under FSDP, DDP or in one process; load_checkpoint reads
# one in a single process (export_hf.py, eval_sft.py, sample_sft.py). Every rank must see out_dir
# (one filesystem shared by the nodes), as for resuming from a one-file checkpoint.

META_FILE = 'meta.pt'
_STEP_DIR = re.compile(r'ckpt_\d{6}')
_STOP_DIR = re.compile(r'ckpt_\d{6}_stop')


def is_sharded_checkpoint(path) -> bool:
    """A directory written by save_sharded_training_state (or a link to one such as ckpt.pt)."""
    return os.path.isfile(os.path.join(path, '.metadata'))


def _quiet_dcp(fn, *args, **kwargs):
    # DCP warns that it "assumes the intent" of a one-process load/save even when told no_dist=True
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled, unavailable or uninitialized')
        return fn(*args, **kwargs)


def save_sharded_training_state(out_dir, model, optimizer, meta: dict, *, step_file: bool,
                                is_best: bool = False, keep_last_n: int = 0) -> str | None:
    """A collective: every rank writes its shard of the model and optimizer state into one directory
    (layout above); rank 0 then adds meta.pt, renames the directory into place and points ckpt.pt
    (and ckpt_best.pt when is_best) at it. Works under FSDP (DTensor shards), DDP (replicated tensors,
    written once, spread over the ranks) and in one process. Returns the line to log on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    rank, world = _rank_world()
    out, iter_num = Path(out_dir), meta['iter_num']
    name = f'ckpt_{iter_num:06d}' + ('' if step_file else '_stop')
    latest = out / 'ckpt.pt'
    # Rank 0 makes the temporary directory and tells the others its name (or why it could not).
    box = [None, None]
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(out, '.ckpt_*.tmp')
            tmp = out / f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
            tmp.mkdir()
            box[0] = str(tmp)
        except OSError as e:
            box[1] = f"{e.strerror or e}"
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointError(f"cannot save {out / name} at iter {iter_num}: {box[1]}; {latest} is the "
                              f"last complete checkpoint")
    tmp = Path(box[0])
    state = {'model': get_model_state_dict(model), 'optimizer': get_optimizer_state_dict(model, optimizer)}
    try:   # a collective; errors of any rank are raised on every rank
        _quiet_dcp(dcp.save, state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=world == 1)
    except (Exception, dcp.CheckpointException) as e:   # the latter is a BaseException
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot save {out / name} at iter {iter_num}: {_first_line(e)}; {latest} "
                              f"is the last complete checkpoint") from e
    # Each rank hashes the file it wrote (still in its page cache), for the check on load
    digests, errors = {}, []
    try:
        digests = {f.name: _sha256(f) for f in sorted(tmp.glob(f'__{rank}_*.distcp'))}
        if rank == 0:
            digests['.metadata'] = _sha256(tmp / '.metadata')
    except OSError as e:
        errors.append(f"rank {rank}: {e.strerror or e}")
    for d, err in _gather((digests, errors)):
        meta.setdefault('shard_sha256', {}).update(d)
        errors += [x for x in err if x not in errors]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot save {out / name} at iter {iter_num}: {errors[0]}; {latest} is the "
                              f"last complete checkpoint")
    if rank != 0:
        return None
    try:
        _check_shards_present(tmp, meta['shard_sha256'])
        save_checkpoint(tmp / META_FILE, meta)
        _move_dir_into_place(tmp, out / name)
        _point(latest, name)
        if is_best:
            _point(out / 'ckpt_best.pt', name)
        _rotate_sharded(out, keep_last_n)
    except (OSError, CheckpointError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror or e if isinstance(e, OSError) else e
        raise CheckpointError(f"cannot save {out / name} at iter {iter_num}: {why}; {latest} is the last "
                              f"complete checkpoint") from e
    return (f"saved {name}/ ({world} shard{'s' if world > 1 else ''}), ckpt.pt"
            f"{' and ckpt_best.pt' if is_best else ''} -> it, at iter {iter_num}")


def _first_line(e: BaseException) -> str:
    """What went wrong, in one line. DCP gathers the ranks' errors into one CheckpointException whose
    text is a traceback: name the first failing rank and its error instead."""
    failures = getattr(e, 'failures', None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        e, where = failures[rank], f"rank {rank}: "
        if isinstance(e, tuple):   # (exception, traceback) in some torch versions
            e = e[0]
    else:
        where = ''
    text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip()
    return f"{where}{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _gather(obj) -> list:
    """Every rank's obj, on every rank (a collective under torchrun)."""
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _check_shards_present(folder: Path, digests: dict) -> None:
    """Every file DCP's .metadata names is here, whole, and has a digest: else some rank wrote to a
    disk rank 0 does not see (out_dir on a node-local disk in a multi-node run)."""
    from torch.distributed.checkpoint import FileSystemReader
    needed = {}
    for info in FileSystemReader(folder).read_metadata().storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    short = [f for f, size in sorted(needed.items())
             if f not in digests or not (folder / f).is_file() or (folder / f).stat().st_size < size]
    if short:
        raise CheckpointError(f"shard files missing or short in {folder}: {', '.join(short)} (out_dir must "
                              f"be on a filesystem that every rank of every node writes to)")


def verify_sharded_checkpoint(folder, digests: dict | None, ranks: tuple[int, int] = (0, 1)) -> None:
    """Check the files of a sharded checkpoint against the sha256 digests in its meta.pt (a byte
    damaged inside a tensor would otherwise load silently). ranks=(rank, world): this process checks
    every world-th file from its rank on, so the ranks of a resumed run share the reading; a
    collective then, every rank raising the same error. Checkpoints without digests pass."""
    folder = Path(folder)
    rank, world = ranks
    bad = []
    for name in sorted(digests or {})[rank::world]:
        try:
            if _sha256(folder / name) != digests[name]:
                bad.append(f"{name} does not match its sha256 in {META_FILE} (damaged)")
        except OSError as e:
            bad.append(f"{name}: {e.strerror or e}")
    if world > 1:
        bad = sorted(b for part in _gather(bad) for b in part)
    if bad:
        older = sorted(p.name for p in folder.parent.iterdir() if _STEP_DIR.fullmatch(p.name) and p.name < folder.name)
        hint = (f"fall back to an older one: `ln -sfn {older[-1]} {folder.parent / 'ckpt.pt'}` then "
                f"init_from='resume' (older ones: {', '.join(older[-4:])})" if older else
                'no older ckpt_XXXXXX/ beside it to fall back to')
        raise CheckpointError(f"{folder}: damaged sharded checkpoint: {'; '.join(bad[:3])}; {hint}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _trash_name(folder: Path) -> Path:
    """A temporary name that the next save's _remove_stale_temps deletes if this process dies."""
    return folder.parent / f'.{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp'


def _move_dir_into_place(tmp: Path, final: Path) -> None:
    """rename(tmp, final). A directory already named `final` is one nothing points at (the run went
    back to an earlier checkpoint, or a kill came between rename and relink): it is moved aside first,
    since rename cannot replace a non-empty directory, then deleted."""
    old = None
    if final.exists():
        old = _trash_name(final)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _point(link: Path, target_name: str) -> None:
    """Atomically make `link` a relative symlink to target_name (it may have been a one-file ckpt.pt)."""
    tmp = link.parent / f'.{link.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _rotate_sharded(out: Path, keep_last_n: int) -> None:
    """Delete step directories beyond the newest keep_last_n (0 = keep all) and stop directories,
    except those ckpt.pt or ckpt_best.pt point at. Renamed to a temporary name before deleting, so a
    kill mid-delete never leaves a half-deleted checkpoint under a checkpoint's name."""
    pointed = {os.path.realpath(p) for p in (out / 'ckpt.pt', out / 'ckpt_best.pt') if p.is_symlink()}
    names = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink())
    steps = [n for n in names if _STEP_DIR.fullmatch(n)]
    doomed = (steps[:-keep_last_n] if keep_last_n > 0 else []) + [n for n in names if _STOP_DIR.fullmatch(n)]
    for n in doomed:
        if os.path.realpath(out / n) not in pointed:
            trash = _trash_name(out / n)
            os.rename(out / n, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _architecture(ckpt: dict, path, dropout=None) -> ModelArchitectureConfig:
    """The checkpoint's model_args as a config (dropout replaced if given); bad ones name the file."""
    model_args = dict(ckpt['model_args'])
    if dropout is not None:
        model_args['dropout'] = float(dropout)
    try:
        return ModelArchitectureConfig.from_dict(model_args)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad model_args: {e}") from e


def open_sharded_checkpoint(path, dropout=None) -> tuple[ConfigurableGPT, dict]:
    """The metadata of a sharded checkpoint and its model built on the meta device (no memory, no
    init): -> (model, ckpt). The weights come later, each rank reading only its own shard, through
    materialize() then restore_training_state (train_sft's resume), or load_sharded_checkpoint.
    ckpt is meta.pt's dict plus 'dcp_dir', the checkpoint directory."""
    folder = Path(os.path.realpath(path))
    if not is_sharded_checkpoint(folder) or not (folder / META_FILE).is_file():
        raise CheckpointError(f"{path}: not a sharded nanoSFT checkpoint (a directory with .metadata and "
                              f"{META_FILE})")
    try:
        ckpt = _torch_load(folder / META_FILE, 'cpu')
    except Exception as e:
        raise CheckpointError(f"{folder / META_FILE}: not readable (truncated or corrupt?): {_first_line(e)}") from e
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt:
        raise CheckpointError(f"{folder / META_FILE}: not the metadata of a nanoSFT checkpoint (no model_args)")
    if ckpt.get('format_version', FORMAT_VERSION) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {ckpt['format_version']!r}, this nanoSFT "
                              f"reads version {FORMAT_VERSION}")
    config = _architecture(ckpt, path, dropout)
    with torch.device('meta'):
        model = ConfigurableGPT(config)
    # materialize() leaves every tensor uninitialized and DCP fills the state dict: a buffer outside
    # it (non-persistent) would stay garbage
    persistent = set(model.state_dict())
    computed = [n for n, _ in model.named_buffers() if n not in persistent]
    if computed:
        raise CheckpointError(f"{path}: the model has non-persistent buffers {computed}, which a sharded "
                              f"checkpoint does not hold")
    ckpt['model_args'], ckpt['dcp_dir'] = config.to_dict(), str(folder)
    return model, ckpt


def materialize(model, device) -> None:
    """Allocate (uninitialized) the tensors of a meta-device model, before FSDP or after fully_shard
    (then each rank allocates only its shard). to_empty unties shared parameters of a plain module."""
    model.to_empty(device=device)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.transformer.wte.weight:
        model.tie_weights()


def _dcp_load(folder, state: dict, no_dist: bool) -> None:
    """dcp.load, strict about the model's keys as load_state_dict is (DCP ignores extra keys)."""
    import torch.distributed.checkpoint as dcp
    try:
        saved = {k[len('model.'):] for k in dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
                 if k.startswith('model.')}
        wanted = set(state['model'])
        if saved != wanted:
            raise CheckpointError(f"{folder}: weights do not fit model_args: missing {sorted(wanted - saved)[:5]}, "
                                  f"unexpected {sorted(saved - wanted)[:5]}")
        _quiet_dcp(dcp.load, state, checkpoint_id=folder, no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, dcp.CheckpointException) as e:   # the latter is a BaseException   # missing or damaged shard files, keys or shapes that do not fit model_args
        raise CheckpointError(f"{folder}: cannot read the sharded checkpoint: {_first_line(e)}") from e


def load_sharded_checkpoint(path, device='cpu', dropout=None, verify: bool = True) -> tuple[ConfigurableGPT, dict]:
    """load_checkpoint for a sharded checkpoint: the whole model in this one process, whatever the
    number of ranks that wrote it (the optimizer state is not read), after checking every file's
    bytes (verify)."""
    model, ckpt = open_sharded_checkpoint(path, dropout)
    if verify:
        verify_sharded_checkpoint(ckpt['dcp_dir'], ckpt.get('shard_sha256'))
    materialize(model, 'cpu')
    _dcp_load(ckpt['dcp_dir'], {'model': model.state_dict()}, no_dist=True)
    return model.to(device), ckpt


def load_sharded_training_state(ckpt: dict, model, optimizer) -> None:
    """Model weights and optimizer state from a sharded checkpoint (ckpt from open_sharded_checkpoint)
    into the model as it is sharded now (FSDP on any number of ranks, DDP, one process): the ranks
    share checking the files' digests, then DCP reads each rank's part. A collective."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    folder = ckpt['dcp_dir']
    verify_sharded_checkpoint(folder, ckpt.get('shard_sha256'), _rank_world())
    # get_optimizer_state_dict gives AdamW its state tensors (a step with lr 0 and zero gradients) for
    # DCP to load into
    state = {'model': get_model_state_dict(model), 'optimizer': get_optimizer_state_dict(model, optimizer)}
    _dcp_load(folder, state, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state['model'])
    set_optimizer_state_dict(model, optimizer, state['optimizer'])
