"""Fault injection for tests/test_reliability.py.

Run as a wrapper around train_sft.main (plain python or under torchrun):

    python tests/reliability_helpers.py [train_sft.py arguments...]

Environment knobs, all optional:
  RELIAB_EVENTS=prefix    append one line per event to `prefix.<rank>`: 'pid P' (at start-up), 'iter N' (a step
                          starts), 'fb M' (it ran M micro-batches), 'save_begin PATH', 'save_end PATH'
                          (PATH = out_dir for a sharded checkpoint)
  RELIAB_SLOW_SAVE=sec    torch.save writes its bytes in 8 chunks spread over `sec` seconds, and a
                          sharded save's shard writing (DCP) waits `sec` / 2 before and after, so a
                          SIGKILL can land in the middle of a checkpoint write
  RELIAB_RAISE_AT=N       with RELIAB_RAISE_RANK=r: rank r raises RuntimeError when step N starts
  RELIAB_AUDIT_WRITES=1   log 'write PATH' for every file this rank opens for writing, creates,
                          renames or links (to prove that only rank 0 writes)
Everything is patched from outside: train_sft.py, checkpoint.py and torch stay untouched.
"""
from __future__ import annotations

import builtins
import io
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_tokenizer(path) -> str:
    """A byte-level BPE tokenizer of 300 ids (<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2) saved as a
    Hugging Face directory. With it the test model has a 320-row embedding instead of Qwen's 151936,
    so checkpoints are ~1 MB and every kill/resume cycle is fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = 'red green blue cat dog sun moon tree fish bird repeat user assistant system tool'.split()
    tok.train_from_iterator([' '.join(words)] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|endoftext|>').save_pretrained(str(path))
    return str(path)


def _install_hooks():
    import torch

    import checkpoint
    import train_sft
    rank = int(os.environ.get('RANK', 0))
    prefix = os.environ.get('RELIAB_EVENTS')
    log_fd = os.open(f'{prefix}.{rank}', os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if prefix else None

    def event(*words):
        if log_fd is not None:   # one os.write per line: survives SIGKILL, no buffering
            os.write(log_fd, (' '.join(str(w) for w in words) + '\n').encode())

    event('pid', os.getpid())   # torchrun's workers are not in its process group: kill them by pid
    raise_at = int(os.environ.get('RELIAB_RAISE_AT', -1))
    raise_rank = int(os.environ.get('RELIAB_RAISE_RANK', -1))
    real_get_lr = train_sft.get_lr

    def get_lr(it, cfg):   # called once at the start of every optimizer step
        event('iter', it)
        if it == raise_at and rank == raise_rank:
            raise RuntimeError(f'injected failure on rank {rank} at iter {it}')
        return real_get_lr(it, cfg)
    train_sft.get_lr = get_lr

    real_fb = train_sft.forward_backward

    def forward_backward(model, batches, *a, **k):
        out = real_fb(model, batches, *a, **k)
        event('fb', len(batches))
        return out
    train_sft.forward_backward = forward_backward

    real_save_ckpt = checkpoint.save_checkpoint

    def save_checkpoint(path, ckpt):   # train_sft imports it at call time, so this one is used
        event('save_begin', path)
        real_save_ckpt(path, ckpt)
        event('save_end', path)
    checkpoint.save_checkpoint = save_checkpoint

    real_save_sharded = checkpoint.save_sharded_training_state

    def save_sharded_training_state(out_dir, *a, **k):   # save_training_state looks it up at call time
        event('save_begin', out_dir)
        msg = real_save_sharded(out_dir, *a, **k)
        event('save_end', out_dir)
        return msg
    checkpoint.save_sharded_training_state = save_sharded_training_state

    slow = float(os.environ.get('RELIAB_SLOW_SAVE', 0))
    if slow > 0:
        real_torch_save = torch.save

        def slow_torch_save(obj, f, *a, **k):
            if not hasattr(f, 'write') or isinstance(f, io.BytesIO):   # DCP serializes small objects so
                return real_torch_save(obj, f, *a, **k)
            buf = io.BytesIO()
            real_torch_save(obj, buf, *a, **k)
            data, n = buf.getvalue(), 8
            for i in range(n):
                f.write(data[i * len(data) // n:(i + 1) * len(data) // n])
                f.flush()
                time.sleep(slow / n)
        torch.save = slow_torch_save
        from torch.distributed.checkpoint import FileSystemWriter
        real_write_data = FileSystemWriter.write_data

        def slow_write_data(self, *a, **k):
            time.sleep(slow / 2)
            out = real_write_data(self, *a, **k)
            time.sleep(slow / 2)
            return out
        FileSystemWriter.write_data = slow_write_data

    if os.environ.get('RELIAB_AUDIT_WRITES'):
        _audit_writes(event)


def _audit_writes(event):
    import shutil
    import tempfile
    real_open, real_os_open = builtins.open, os.open

    def audited_open(file, mode='r', *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in 'wax+'):
            event('write', os.path.abspath(file))
        return real_open(file, mode, *a, **k)

    def audited_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            event('write', os.path.abspath(path))
        return real_os_open(path, flags, *a, **k)

    def wrap(fn, name):
        def audited(src, dst, *a, **k):
            event('write', os.path.abspath(dst))
            return fn(src, dst, *a, **k)
        audited.__name__ = name
        return audited

    def audited_makedirs(path, *a, **k):
        event('write', os.path.abspath(path))
        return real_makedirs(path, *a, **k)

    real_makedirs = os.makedirs
    builtins.open, os.open = audited_open, audited_os_open
    os.replace, os.rename, os.link = wrap(os.replace, 'replace'), wrap(os.rename, 'rename'), wrap(os.link, 'link')
    shutil.copyfile = wrap(shutil.copyfile, 'copyfile')
    os.makedirs = audited_makedirs
    tempfile.tempdir = tempfile.gettempdir()   # computed before auditing: not a write of ours


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    _install_hooks()
    import train_sft
    train_sft.main(sys.argv[1:])
