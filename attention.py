"""Causal attention for ConfigurableGPT, with or without document boundaries (packed rows).

A packed row holds several documents back to back; a token may attend only to earlier tokens of its
own document. The boundaries come as `cu_seqlens` (flash-attn's convention): int32 offsets of every
document's start in the flattened (B*T) token stream, and the total B*T at the end, so the
documents of all rows form one list. sft_data's packer makes them on the host with the batch.

Paths for packed rows (ModelArchitectureConfig.attention, chosen per call by `resolve`):
  'varlen'   torch.nn.attention.varlen.varlen_attn: the flash kernel over the document list, native
             GQA, no mask; CUDA with fp16/bf16 q/k/v only. Cost ~ sum of squared document lengths.
  'per_doc'  causal SDPA per document with enable_gqa (no K/V copies; on CPU its flash kernel), on
             token-major views: also ~ sum of squared lengths, for CPU (FlexAttention has no backward
             there) and fp32 CUDA. Saved for backward: q, k, v, the output and its logsumexp.
  'dense'    the (B, 1, T, T) boolean mask from the document ids and SDPA over the whole row, K/V
             repeated per query head (the memory-efficient CUDA kernel takes a mask but no GQA).
             O(T^2) time and memory; kept as the reference the others are tested against.
  'auto'     varlen where it runs, per_doc elsewhere.
Rows without documents (padding, generation) take SDPA's causal or masked path in the model.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from model_config import ATTENTION_CHOICES


def varlen_available() -> bool:
    """torch's flash varlen_attn, taking the arguments document_attention passes: torch 2.9's took
    is_causal; window_size and enable_gqa are in 2.12's."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return {'window_size', 'enable_gqa'} <= set(inspect.signature(varlen_attn).parameters)


def resolve(choice: str, device_type: str, dtype: torch.dtype, dropout: float = 0.0) -> tuple[str, str]:
    """The path that attention `choice` takes for packed rows on this device and q/k/v dtype, and why.
    Pure host logic: the model calls it per forward, train_sft once to log the choice."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {choice!r}")
    flash_ok = device_type == 'cuda' and dtype in (torch.float16, torch.bfloat16) and varlen_available()
    if choice == 'varlen':
        if not flash_ok:
            raise ValueError(f"attention='varlen' needs CUDA with float16/bfloat16 and torch >= 2.12 "
                             f"(here: {device_type}, {dtype}); use 'auto' or 'per_doc'")
        if dropout > 0:
            raise ValueError("attention='varlen' has no attention dropout; use 'per_doc' or dropout=0")
        return 'varlen', 'as configured'
    if choice != 'auto':
        return choice, 'as configured'
    if flash_ok and dropout == 0:
        return 'varlen', 'auto: flash varlen kernel on CUDA'
    why = ('the flash kernel needs fp16/bf16' if device_type == 'cuda' and dropout == 0 else
           'varlen_attn has no dropout' if device_type == 'cuda' else
           'CPU: no varlen kernel, FlexAttention has no backward')
    return 'per_doc', f'auto: {why}'


def describe(choice: str, device_type: str, dtype: torch.dtype, dropout: float, packing: bool, block_size: int,
             ac: str = 'none', ac_every: int = 2) -> str:
    """The log line naming the path training rows take and the activation checkpointing (train_sft
    prints it once)."""
    if packing:
        path, why = resolve(choice, device_type, dtype, dropout)
        line = f"attention: {path} ({why}), packed rows of {block_size}"
    else:
        line = "attention: causal SDPA (padded rows: no documents to separate)"
    return f"{line}; activation checkpointing: {ac}" + (f" (every {ac_every} blocks)" if ac == 'selective' else '')


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document ids (B, T), equal within a document and changing between neighbours, -> cu_seqlens.
    On CPU tensors this is free; on a GPU it costs a host sync (nonzero): make cu_seqlens on the
    host with the batch instead (sft_data does)."""
    B, T = doc_ids.shape
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = start.flatten().nonzero().squeeze(1)
    return torch.cat([starts, starts.new_full((1,), B * T)]).to(torch.int32)


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """The inverse, for the dense path: (B, T) ids numbering the documents of the flattened stream."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    ids = torch.arange(len(lengths), device=cu.device)
    return ids.repeat_interleave(lengths, output_size=B * T).view(B, T)


def dense_doc_mask(doc_ids: torch.Tensor, past: int = 0) -> torch.Tensor:
    """(B, 1, T, T) bool: causal and inside the document (True = may attend)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return causal[None, None] & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])


def packed_documents(choice, B, T, doc_ids, cu_seqlens, max_seqlen, device):
    """The model's view of a packed batch -> (dense mask or None, Documents or None)."""
    if choice == 'dense':
        if doc_ids is None:
            doc_ids = doc_ids_from_cu_seqlens(cu_seqlens.to(device), B, T)
        return dense_doc_mask(doc_ids), None
    if cu_seqlens is None:
        cu_seqlens = cu_seqlens_from_doc_ids(doc_ids)
    docs = Documents(cu_seqlens, max_seqlen, choice)
    # the device copy made here, not at the first layer's use: under torch.compile, filling the cache
    # from inside a checkpointed block is a side effect that sends the block back to eager
    docs.cu_on(device)
    return None, docs


class Documents:
    """The document boundaries of one forward, shared by all layers. `lengths` (host ints, what
    per_doc needs) and the device copy of cu_seqlens (what varlen needs) are made once, lazily."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int | None, choice: str):
        self.cu_seqlens, self.choice = cu_seqlens, choice
        self._max, self._lengths, self._device_cu = max_seqlen, None, None

    @property
    def lengths(self) -> list[int]:
        if self._lengths is None:   # free when cu_seqlens is on the host; a sync on a GPU
            self._lengths = torch.diff(self.cu_seqlens).tolist()
        return self._lengths

    def max_seqlen(self) -> int:
        if self._max is None:
            self._max = max(self.lengths)
        return self._max

    def cu_on(self, device) -> torch.Tensor:
        if self._device_cu is None:
            self._device_cu = self.cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        return self._device_cu


def document_attention(q, k, v, docs: Documents, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention inside documents. q: (N, H, D), k and v: (N, H_kv, D) token-major, N = B*T
    tokens of the flattened rows -> (N, H, D)."""
    dev = q.device.type
    # Under autocast SDPA runs in the autocast dtype; varlen_attn, a custom op, is not cast by
    # autocast, and RoPE / QK-norm in fp32 hand it fp32 q and k: cast as SDPA's autocast would.
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    path, _ = resolve(docs.choice, dev, dtype, dropout_p)
    gqa = k.shape[1] != q.shape[1]
    if path == 'varlen':
        from torch.nn.attention.varlen import varlen_attn
        cu, m = docs.cu_on(q.device), docs.max_seqlen()
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return varlen_attn(q, k, v, cu, cu, m, m, window_size=(-1, 0), enable_gqa=gqa)
    if path != 'per_doc':
        raise ValueError(f"document_attention: path {path!r} is handled by the model's mask")
    return _per_doc(q, k, v, docs, dropout_p, gqa)


# Eager under torch.compile: the document lengths change every batch (a graph per length list
# would recompile until the cache limit). split/cat, not slicing: the backward of n slices would
# build n full-size zero gradients (O(n T)), the backward of split concatenates once. 4-D views:
# CPU SDPA takes its flash kernel (GQA native, O(L) saved state) only for 4-D inputs; 3-D ones fall
# back to the math kernel, which expands K/V and keeps the L x L probabilities for backward.
# torch._disable_dynamo is torch.compiler.disable imported on first call: the public decorator
# imports torch._dynamo when this module loads, ~1 s of every command's start.
@torch._disable_dynamo
def _per_doc(q, k, v, docs, dropout_p, gqa):
    lengths = docs.lengths   # read in the eager region: traced, the property compiles a frame of its own
    outs = [F.scaled_dot_product_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None],
                                           c.transpose(0, 1)[None], is_causal=True,
                                           dropout_p=dropout_p, enable_gqa=gqa)[0]
            for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat([o.transpose(0, 1) for o in outs])
