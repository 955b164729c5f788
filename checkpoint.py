"""Checkpoints: one torch.save dict that rebuilds its model from `model_args` alone.

Keys: 'model' (clean state dict), 'model_args' (ModelArchitectureConfig.to_dict()), 'optimizer',
'iter_num', 'best_val_loss', 'config', 'rng', 'data_state', 'tokenizer', 'format_version'.
Keep every value tensors / numbers / strings / lists / dicts: then plain `torch.load(path)`
(weights_only=True, the torch default) reads it, as the specification's loading snippet does.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

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
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.{os.getpid()}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
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


def read_checkpoint(path, device='cpu') -> dict:
    """Load and sanity-check a checkpoint dict; every failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
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


def load_checkpoint(path, device='cpu', dropout=None) -> tuple[ConfigurableGPT, dict]:
    """Rebuild the model from ckpt['model_args'] and load ckpt['model'] -> (model, ckpt).
    dropout overrides the saved value (e.g. 0.0 for evaluation, or a new value for fine-tuning)."""
    ckpt = read_checkpoint(path, device='cpu')
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
