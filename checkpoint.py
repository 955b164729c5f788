"""Checkpoints: one torch.save dict that rebuilds its model from `model_args` alone, and the
training state around it.

Keys: 'model' (clean state dict), 'model_args' (ModelArchitectureConfig.to_dict()), 'optimizer'
(keyed by parameter name), 'iter_num', 'best_val_loss', 'config', 'rng' (one state per rank),
'data_state' (the sampler's cursor), 'tokenizer', 'evaluated', 'format_version' (+ 'scaler' under
fp16). Keep every value tensors / numbers / strings / lists / dicts: then plain `torch.load(path)`
(weights_only=True, the torch default) reads it, as the SFT spec's loading snippet does.

    save_training_state(...)      every rank calls it (a collective); rank 0 writes ckpt_XXXXXX.pt,
                                  ckpt.pt (a hard link), ckpt_best.pt, and rotates old step files
    restore_training_state(...)   optimizer, grad scaler, sampler cursor, RNG states -> iter_num
"""
from __future__ import annotations

import os
import pickle
import random
import secrets
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig

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
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _remove_stale_temps(folder: Path) -> None:
    """Delete the temp files of saves whose process is gone (killed mid-write): they are never read,
    but each is checkpoint-sized, so a few kills during saves would otherwise fill the disk."""
    for p in folder.glob('.*.pt.*.*.tmp'):
        pid = p.name[:-len('.tmp')].rsplit('.', 2)[-2]   # .{name}.{pid}.{random}.tmp
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
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


def load_checkpoint(path, device='cpu', dropout=None, verify: bool = True) -> tuple[ConfigurableGPT, dict]:
    """Rebuild the model from ckpt['model_args'] and load ckpt['model'] -> (model, ckpt), after
    checking the file's bytes (verify_checkpoint). dropout overrides the saved value (e.g. 0.0 for
    evaluation, or a new value for fine-tuning)."""
    ckpt = read_checkpoint(path, device='cpu', verify=verify)
    model_args = dict(ckpt['model_args'])
    if dropout is not None:
        model_args['dropout'] = float(dropout)
    try:
        config = ModelArchitectureConfig.from_dict(model_args)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad model_args: {e}") from e
    sd = clean_state_dict(ckpt['model'])
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
                        fsdp: bool = False, extra: dict | None = None) -> str | None:
    """Everything exact resume needs, from every rank. A collective under torchrun: every rank calls
    it (RNG states are gathered; under FSDP the full state is gathered to rank 0), rank 0 writes.
    step_file=True (an evaluation step): ckpt_{iter:06d}.pt, ckpt.pt as a link to it, ckpt_best.pt
    when is_best, and only the newest keep_last_n step files kept (0 = all); step_file=False (a
    stop between evaluations): ckpt.pt alone. `extra` adds keys (config, data_state, tokenizer...).
    Returns the line to log on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    rank, world = _rank_world()
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, get_rng_state())
    else:
        rngs = [get_rng_state()]
    # The optimizer state is keyed by parameter name, so one process, DDP and FSDP resume each other's.
    if fsdp:   # gathering the full state is a collective: every rank runs it, rank 0 gets the tensors
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=opts)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if rank != 0:
        return None
    if not fsdp:
        model_sd, optim_sd = model.state_dict(), get_optimizer_state_dict(model, optimizer)
    checkpoint = {'model': model_sd, 'model_args': model.config.to_dict(), 'optimizer': optim_sd,
                  'iter_num': iter_num, 'best_val_loss': best_val_loss, 'rng': rngs,
                  'evaluated': step_file, 'format_version': FORMAT_VERSION, **(extra or {})}
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
    and keeps its own shard. -> (iter_num, best_val_loss, resumed_at): resumed_at is the iteration
    whose evaluation already ran (None after a stop between evaluations, so it runs again)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    rank, world = _rank_world()
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
