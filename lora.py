"""LoRA, DoRA and QLoRA for ConfigurableGPT: adapters around nn.Linear in plain PyTorch, the frozen
base in 4-bit NF4 through torchao, an exact merge, and PEFT adapter directories out and in.

`apply_lora(model, LoRAConfig(...))` swaps the targeted projections' nn.Linear for LoRALinear in
place and freezes everything else; the model class itself has no LoRA branch. LoRALinear keeps
nn.Linear's `weight` / `bias`, so a full state dict of the base still loads into it.

One adapter per Hugging Face projection. ConfigurableGPT fuses q|k|v into `attn.c_attn` and
gate|up into `mlp.c_fc`; an adapter belongs to a row slice of such a fused weight (q_proj: A r x in,
B out_q x r), exactly as PEFT holds it on the separate HF module, so adapter directories move
between the two unchanged. The slices come from the HF weight-name table (`_weight_map`), the one
place our names meet Hugging Face's. Forward of a LoRALinear whose slices i are targeted:

    y = x W^T + b + s * concat_i( (drop(x) A_i^T) B_i^T )        s = alpha / r  (rsLoRA: alpha / sqrt r)

with the A_i stacked into one matmul (x, the big operand, is read once) and a small matmul per B_i.
DoRA (Liu et al. 2024, as PEFT computes it) rescales each row: W'_i = m_i * V_i / ||V_i||_row with
V_i = W_i + s B_i A_i and the norm a constant in backward (the paper's section 4.3, PEFT too).

LoRAConfig.base_dtype 'bfloat16' holds the frozen projection weights in bf16: bit-identical under
bf16 autocast (which casts each use to bf16 anyway); without autocast each use is cast up by
_UpcastLinear, which keeps only the bf16 weight for backward (fp32 math on the bf16-rounded base).

QLoRA (Dettmers et al. 2023): every frozen projection weight becomes a torchao NF4Tensor (4-bit
NormalFloat in blocks of 64, block scales double-quantized to int8); F.linear on it dequantizes on
the fly and saves only the 4-bit tensor for backward. The merge folds the adapters into the
*dequantized* NF4 base, the base the adapter was trained on, never the original weights (whose
quantization error the adapter never saw: peft #2321, transformers #31293).

'embed_tokens' / 'lm_head' as targets train that matrix in full (PEFT's `modules_to_save`); with
tied embeddings both names are the one shared matrix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_interop import _weight_map, write_dir
from model_builder import HEAD_BLOCK_ROWS, ConfigurableGPT, compute_dtype

PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
NF4_BLOCK = 64             # torchao's (and bitsandbytes') NF4 block: one absmax scale per 64 weights
NF4_SCALER_BLOCK = 256     # scales double-quantized in groups of 256 blocks
PEFT_PREFIX = 'base_model.model.'
BASE_DTYPES = ('float32', 'bfloat16')


class LoRAError(ValueError):
    """A LoRA configuration, adapter file or base that does not fit: the message says what and where."""


# ---------------------------------------------------------------------- config
@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0                   # on the adapter input only
    # Hugging Face projection names (q_proj ... down_proj; GPT-2: c_attn, c_proj, c_fc), 'all' = every
    # attention and MLP projection; 'embed_tokens' / 'lm_head' train that matrix in full.
    targets: tuple[str, ...] = ('all',)
    rslora: bool = False                   # scale alpha / sqrt(rank) instead of alpha / rank
    dora: bool = False                     # weight-decomposed LoRA: a trained magnitude per output row
    quantize: bool = False                 # QLoRA: frozen projection weights in NF4
    # QLoRA: the frozen token embedding and LM head (one table when tied) in NF4 too. Off by default,
    # as in QLoRA, PEFT and torchtune: the head's logits then come from 4-bit weights.
    quantize_embeddings: bool = False
    # the dtype the frozen (not NF4) projection weights are held in: 'bfloat16' halves the base.
    # Under bf16 autocast it is bit-identical (autocast casts each weight to bf16 at every use
    # anyway); without autocast (CPU, fp32) each use upcasts it: fp32 math on the bf16-rounded base,
    # exact for the bf16 checkpoints models ship as.
    base_dtype: str = 'float32'

    def __post_init__(self):
        targets = self.targets
        if isinstance(targets, str):
            targets = targets.split(',')
        targets = tuple(dict.fromkeys(t.strip() for t in targets if t and t.strip()))
        object.__setattr__(self, 'targets', targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LoRAError(f"lora rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LoRAError(f"lora alpha must be > 0, got {self.alpha!r}")
        object.__setattr__(self, 'alpha', float(self.alpha))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not targets:
            raise LoRAError("lora targets is empty: name projections (q_proj, ...) or 'all'")
        if self.base_dtype not in BASE_DTYPES:
            raise LoRAError(f"lora base dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        if self.quantize_embeddings and not self.quantize:
            raise LoRAError("quantize_embeddings holds the embedding in NF4 beside an NF4 base: it needs QLoRA "
                            "(quantize=True, finetune='qlora')")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d['targets'] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'LoRAConfig':
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise LoRAError(f"unknown LoRA config key(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**{k: tuple(v) if k == 'targets' else v for k, v in d.items()})


def resolve_base_dtype(setting: str, compute_dtype: str) -> str:
    """lora_base_dtype='auto': bfloat16 where training runs under bf16 autocast (CUDA or CPU), where
    it changes nothing but memory (Qwen3-8B's 6.9B projection weights: 14 GB instead of 28 GB of fp32
    plus 14 GB of the bf16 casts autocast keeps for backward); float32 elsewhere, so an fp32 run
    trains on the base as given."""
    if setting == 'auto':
        return 'bfloat16' if compute_dtype == 'bfloat16' else 'float32'
    return setting


def check_qlora_device(cfg: LoRAConfig, dtype: torch.dtype, device_type: str) -> None:
    """QLoRA dequantizes every weight at every use in the compute dtype. CPUs have no fast float16
    matmuls, so a float16 QLoRA run there would be slower than float32 at every step, for nothing:
    refused before anything is loaded."""
    if cfg.quantize and device_type == 'cpu' and dtype == torch.float16:
        raise LoRAError("QLoRA with dtype float16 on CPU is not supported (CPUs have no fast float16 "
                        "matmuls): use dtype bfloat16 or float32")


# ---------------------------------------------------------------------- where the projections are
@dataclass(frozen=True)
class Slice:
    target: str      # the HF projection name: 'q_proj'
    hf_name: str     # the HF module it is, PEFT's name for it: 'model.layers.3.self_attn.q_proj'
    start: int       # its rows in our (possibly fused) weight
    size: int


def _layout_model_type(config) -> str:
    try:
        return config.hf_model_type()
    except ValueError:   # no HF twin: name the projections as the closest family does
        return 'llama' if config.mlp_type == 'swiglu' else 'gpt2'


def projection_layout(model: ConfigurableGPT) -> dict[str, list[Slice]]:
    """Our Linear module path -> its HF projections in row order, from the HF weight-name table."""
    config = model.config
    layout = {}
    for ours, names, how in _weight_map(config, _layout_model_type(config)):
        path = ours.removesuffix('.weight')
        if not ours.endswith('.weight') or path == 'lm_head' or not path.startswith('transformer.h.'):
            continue
        if not isinstance(model.get_submodule(path), (nn.Linear, LoRALinear)):
            continue
        sizes = how if isinstance(how, list) else [model.get_submodule(path).weight.shape[0]]
        hf = [n.removesuffix('.weight') for n in names]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        layout[path] = [Slice(h.rsplit('.', 1)[-1], h, s, n) for h, s, n in zip(hf, starts, sizes)]
    return layout


def full_module_names(model: ConfigurableGPT) -> dict[str, tuple[str, str]]:
    """Target name -> (our module path, HF module name) of the matrices a target trains in full."""
    config = model.config
    embed = next(names[0] for ours, names, _ in _weight_map(config, _layout_model_type(config))
                 if ours == 'transformer.wte.weight').removesuffix('.weight')
    return {embed.rsplit('.', 1)[-1]: ('transformer.wte', embed), 'lm_head': ('lm_head', 'lm_head')}


def resolve_targets(cfg: LoRAConfig, model: ConfigurableGPT) -> tuple[set[str], set[str]]:
    """-> (projection names to adapt, full-trained module names); unknown names are an error."""
    layout, full = projection_layout(model), full_module_names(model)
    known = list(dict.fromkeys(s.target for slices in layout.values() for s in slices))
    adapt, train = set(), set()
    for t in cfg.targets:
        if t == 'all':
            adapt.update(known)
        elif t in known:
            adapt.add(t)
        elif t in full:
            train.add(t)
        else:
            raise LoRAError(f"unknown LoRA target {t!r}; this model has: 'all', "
                            f"{', '.join(map(repr, known + list(full)))}")
    return adapt, train


# ---------------------------------------------------------------------- NF4 (torchao)
def _torchao_nf4():
    """torchao's to_nf4, imported on first use (QLoRA only). On a CPU-only machine its import logs
    that its CUDA kernels do not load; that is expected here, so those lines are silenced."""
    quiet = [logging.getLogger(n) for n in ('torchao', 'torch.utils._pytree')]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        from torchao.quantization import to_nf4
    except ImportError as e:
        raise LoRAError("QLoRA needs torchao >= 0.18 (its NF4 tensor): pip install torchao") from e
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
    return to_nf4


def is_nf4(t) -> bool:
    return type(t).__name__ == 'NF4Tensor'


def to_nf4(weight: torch.Tensor, name: str = 'weight') -> nn.Parameter:
    """A frozen NF4 Parameter of `weight` (its dtype is the dtype it dequantizes to)."""
    n = weight.numel()
    if n % NF4_BLOCK:
        raise LoRAError(f"QLoRA: {name} has {n} elements, not a multiple of NF4's block of {NF4_BLOCK}")
    blocks = n // NF4_BLOCK
    # the block scales are quantized in groups: the largest group <= 256 that divides them evenly
    scaler_block = next(b for b in range(min(NF4_SCALER_BLOCK, blocks), 0, -1) if blocks % b == 0)
    q = _torchao_nf4()(weight.detach().contiguous(), block_size=NF4_BLOCK, scaler_block_size=scaler_block)
    return nn.Parameter(q, requires_grad=False)


def nf4_rows(weight, rows=None) -> torch.Tensor:
    """Rows of a 2-D NF4 weight dequantized to its dtype, the others left alone: `rows` a slice or
    an index tensor (an embedding lookup), None for all. The same values as torchao's dequantization
    (a test holds them equal) from its own storage, computed as one table lookup per byte: each
    byte holds two 4-bit codes, so a 256-entry table of code pairs decodes it at once. On this
    project's CPU (CPU-seconds, medians of two runs) 6.6-7.6x faster than torchao's per-code
    decoding for a block of 4096 x 1024, 4.0-4.4x for Qwen3-0.6B's whole 151,936 x 1,024 table,
    with under a third of its temporary memory (torchao decodes through int64 code indices)."""
    V, C = weight.shape
    per_row = C // weight.block_size
    rows = slice(0, V) if rows is None else rows
    codes = weight.quantized_data.view(V, C // 2)[rows]
    scales = weight.quantized_scalers.view(V, per_row)[rows]
    row_ids = torch.arange(*rows.indices(V), device=codes.device) if isinstance(rows, slice) else rows
    block = row_ids[..., None] * per_row + torch.arange(per_row, device=codes.device)
    # double-quantized block scales: int8 / their group's factor, + the mean (torchao's arithmetic)
    scales = (scales / weight.quantization_factor[block // weight.scaler_block_size]).to(weight.dtype) \
        + weight.scaler_mean
    lut = weight.nf4
    pairs = torch.stack([lut.repeat_interleave(16), lut.repeat(16)], dim=-1)   # byte -> (hi, lo) codes
    # each pair read as one word: a 1-D gather, 2.4x faster than gathering rows of two
    words = pairs.contiguous().view({2: torch.int32, 4: torch.int64}[pairs.element_size()]).view(-1)
    values = words.index_select(0, codes.reshape(-1).int()).view(pairs.dtype)
    out = values.view(*codes.shape[:-1], per_row, weight.block_size).mul_(scales[..., None])
    return out.view(*codes.shape[:-1], C)


def dense(weight: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The weight as a plain tensor: an NF4 weight dequantized, anything else cast."""
    with torch.no_grad():
        if is_nf4(weight) and weight.dim() == 2 and weight.shape[1] % weight.block_size == 0:
            return nf4_rows(weight).to(dtype)
        return weight.to(dtype)   # NF4Tensor.to(dtype) dequantizes


# ---------------------------------------------------------------------- the adapter module
class _UpcastLinear(torch.autograd.Function):
    """F.linear on a frozen weight held in another form than x: bf16 outside autocast, or NF4. The
    weight is made dense at each use, forward and backward, and only the stored (bf16 / NF4) weight
    is kept for backward. F.linear(x, w.float()) would keep the dense copy of every layer's weight
    until backward, the memory the small base was meant to save."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        dtype = compute_dtype(x)
        return F.linear(x, dense(weight, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, = ctx.saved_tensors
        return grad @ dense(weight, grad.dtype), None, None


def frozen_linear(x, weight, bias=None):
    """F.linear with a frozen weight held in another dtype than x (bf16 base) or in NF4."""
    if is_nf4(weight) or weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        return _UpcastLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class LoRALinear(nn.Module):
    """nn.Linear (same `weight` / `bias`, frozen, plain or NF4) plus one LoRA adapter per targeted
    row slice: lora_A[name] (r x in), lora_B[name] (rows x r), DoRA's lora_magnitude[name] (rows)."""

    def __init__(self, linear: nn.Linear, slices: list[Slice], targets: set[str], cfg: LoRAConfig,
                 generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.splits = [(s.target, s.size) for s in slices]          # every slice, in row order
        self.targets = [s.target for s in slices if s.target in targets]
        self.rank, self.scale, self.dora = cfg.rank, cfg.scale, cfg.dora
        self.lora_dropout_p = cfg.dropout   # not `dropout`: train_sft.set_dropout must not reset it
        dev = self.weight.device
        adtype = torch.promote_types(self.weight.dtype, torch.float32)   # adapters train in >= fp32
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for s in slices:
            if s.target not in targets:
                continue
            a = torch.empty(cfg.rank, self.in_features, dtype=adtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)   # PEFT's (and nn.Linear's) init
            self.lora_A[s.target] = nn.Parameter(a.to(dev))
            # B = 0: at init the adapter adds nothing, the model is exactly the base
            self.lora_B[s.target] = nn.Parameter(torch.zeros(s.size, cfg.rank, dtype=adtype, device=dev))
        if self.dora:
            w = dense(self.weight, adtype)
            self.lora_magnitude = nn.ParameterDict(
                {t: nn.Parameter(w[start:start + n].norm(dim=1)) for (t, n), start in self._rows()
                 if t in self.lora_A})

    def _rows(self):
        start = 0
        for t, n in self.splits:
            yield (t, n), start
            start += n

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, targets={self.targets}, "
                f"rank={self.rank}, scale={self.scale:g}, dora={self.dora}, nf4={is_nf4(self.weight)}")

    def delta(self, t: str) -> torch.Tensor:
        """The adapter's weight update s * B A of slice t (rows x in)."""
        return self.scale * (self.lora_B[t] @ self.lora_A[t])

    @torch.no_grad()
    def _dora_factor(self, dtype) -> torch.Tensor:
        """Per output row 1 / ||W + s B A||_row (1 where no DoRA adapter), a constant in backward."""
        w = dense(self.weight, torch.float32)
        inv = torch.ones(self.out_features, dtype=torch.float32, device=w.device)
        for (t, n), start in self._rows():
            if t in self.lora_A:
                v = w[start:start + n] + self.delta(t).float()
                inv[start:start + n] = 1.0 / v.norm(dim=1)
        return inv.to(dtype)

    def forward(self, x):
        y = frozen_linear(x, self.weight, None if self.dora else self.bias)
        if not self.targets:   # a frozen projection without adapters (held in bf16 or NF4)
            return y
        h = F.dropout(x, self.lora_dropout_p, self.training) if self.lora_dropout_p > 0 else x
        A = torch.cat([self.lora_A[t] for t in self.targets]) if len(self.targets) > 1 \
            else self.lora_A[self.targets[0]]
        # Every B in one matmul: block-diagonal over the slices (an untargeted slice of a fused weight,
        # e.g. k_proj when only q_proj and v_proj are, is a block of zero width: rows of zeros). The
        # extra multiplications by zero cost (slices - 1) x the B matmuls, ~2% of the base matmul at
        # rank 16; one output instead of a concatenation of pieces saves more than that on a CPU.
        B = torch.block_diag(*[self.lora_B[t] if t in self.lora_B else A.new_zeros(n, 0)
                               for t, n in self.splits]) if len(self.splits) > 1 else self.lora_B[self.targets[0]]
        ha = F.linear(h, A)
        y = torch.addmm(y.flatten(0, -2), ha.flatten(0, -2), B.t(), alpha=self.scale).view(y.shape)
        if not self.dora:
            return y
        # DoRA: rows scaled by m / ||W + s B A||; rows without an adapter keep factor 1
        mag = torch.cat([self.lora_magnitude[t] if t in self.lora_A else
                         torch.ones(n, dtype=y.dtype, device=y.device) for t, n in self.splits])
        y = y * (mag * self._dora_factor(mag.dtype)).to(y.dtype)
        return y + self.bias if self.bias is not None else y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """fp32 W + s B A per slice (DoRA: rescaled to its magnitude), on the dequantized base."""
        w = dense(self.weight, torch.float32).clone()
        for (t, n), start in self._rows():
            if t in self.lora_A:
                v = w[start:start + n] + self.delta(t).float()
                if self.dora:
                    v = self.lora_magnitude[t].float()[:, None] * v / v.norm(dim=1, keepdim=True)
                w[start:start + n] = v
        return w


# ---------------------------------------------------------------------- apply / merge
def apply_lora(model: ConfigurableGPT, cfg: LoRAConfig, seed: int = 0, device=None) -> ConfigurableGPT:
    """Freeze the model and add the adapters of cfg, in place (returns the model).

    seed: the adapters' init (a generator of its own: every rank of a run draws the same A).
    device: where the NF4 weights are quantized and kept (QLoRA), layer by layer, so a base that
    does not fit the device unquantized still can be loaded on the CPU and quantized there."""
    if getattr(model, 'lora_config', None) is not None:
        raise LoRAError("this model already has LoRA adapters")
    adapt, train = resolve_targets(cfg, model)
    layout = projection_layout(model)
    projections = {id(model.get_submodule(path).weight) for path in layout}
    for p in model.parameters():
        p.requires_grad_(False)
        if id(p) not in projections and p.dtype != torch.float32:
            p.data = p.data.float()   # a base read as stored (bf16): all but the projections in fp32
    gen = torch.Generator().manual_seed(seed)
    held = torch.float32 if cfg.quantize else getattr(torch, cfg.base_dtype)
    recast = held != torch.float32   # the frozen projections held in bf16
    for path, slices in layout.items():
        parent, _, child = path.rpartition('.')
        linear = model.get_submodule(path)
        if cfg.quantize:   # from fp32 values, as a base loaded in fp32 would be quantized
            w = linear.weight.detach()
            linear.weight = to_nf4((w.to(device) if device is not None else w).float(), f"{path}.weight")
            if device is not None and linear.bias is not None:
                linear.bias.data = linear.bias.data.to(device)
        elif linear.weight.dtype != held:
            linear.weight = nn.Parameter(linear.weight.detach().to(held), requires_grad=False)
        # an untargeted bf16 projection is a LoRALinear too, without adapters: its forward upcasts
        if recast or any(s.target in adapt for s in slices):
            setattr(model.get_submodule(parent), child, LoRALinear(linear, slices, adapt, cfg, gen))
    full = full_module_names(model)
    for t in train:
        model.get_submodule(full[t][0]).weight.requires_grad_(True)
    if cfg.quantize_embeddings:
        quantize_embeddings(model, device)
    model.lora_config = cfg
    return model


class NF4Embedding(nn.Module):
    """A frozen token embedding held in NF4: a lookup dequantizes only the rows it reads (fp32)."""

    def __init__(self, weight: nn.Parameter, padding_idx=None):
        super().__init__()
        self.weight, self.padding_idx = weight, padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, idx):
        return nf4_rows(self.weight, idx.reshape(-1)).view(*idx.shape, -1).float()


class NF4Head(nn.Module):
    """A frozen LM head held in NF4 (the embedding's table when tied). Its rows are dequantized a
    block at a time, here and in the fused loss (`dense_rows`), never the whole table at once."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def dense_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        return nf4_rows(self.weight, slice(start, end)).to(dtype)

    def forward(self, x):
        dtype = compute_dtype(x)
        x = x.to(dtype)
        V = self.out_features
        out = x.new_empty(*x.shape[:-1], V)
        for a in range(0, V, HEAD_BLOCK_ROWS):
            out[..., a:a + HEAD_BLOCK_ROWS] = x @ self.dense_rows(a, min(a + HEAD_BLOCK_ROWS, V), dtype).t()
        return out


def quantize_embeddings(model: ConfigurableGPT, device=None) -> None:
    """QLoRA's quantize_embeddings: the frozen embedding and LM head (one table when tied) in NF4.
    A trained one ('embed_tokens' / 'lm_head' targets) stays as it is."""
    wte, head = model.transformer.wte, model.lm_head
    tied = head.weight is wte.weight
    if not wte.weight.requires_grad and not is_nf4(wte.weight):
        q = _table_to_nf4(wte.weight, 'wte', device)
        model.transformer.wte = NF4Embedding(q, wte.padding_idx)
        if tied:
            model.lm_head = NF4Head(q)
    if not tied and not head.weight.requires_grad and not is_nf4(head.weight):
        model.lm_head = NF4Head(_table_to_nf4(head.weight, 'lm_head', device))


def _table_to_nf4(weight: torch.Tensor, name: str, device) -> nn.Parameter:
    if weight.shape[1] % NF4_BLOCK:
        raise LoRAError(f"quantize_embeddings: the {name} width {weight.shape[1]} is not a multiple "
                        f"of NF4's block of {NF4_BLOCK}")
    # quantized where the model was loaded (the host): torchao's quantizer briefly takes ~2.5x
    # the fp32 table (1.5 GB for Qwen3-0.6B's, measured), which a GPU need not hold
    q = to_nf4(weight.detach().float(), f"{name}.weight")
    return q if device is None else nn.Parameter(q.data.to(device), requires_grad=False)


class FrozenEmbedding(nn.Embedding):
    """A frozen token embedding held in 16 bits whose lookups come out in fp32, so the residual
    stream it starts stays fp32, as from the fp32 table (bf16 -> fp32 is exact)."""

    def forward(self, idx):
        return super().forward(idx).float()


def hold_embeddings_in(model: ConfigurableGPT, dtype: torch.dtype) -> None:
    """Hold the frozen token embedding and LM head in `dtype`, for training under autocast to it.
    There every use of them is in that dtype anyway (the head's matmul; the lookup is cast up for
    the residual stream), so this changes nothing but memory: Qwen3-0.6B's tied 151,936 x 1,024
    table 0.58 -> 0.29 GiB and no bf16 copy of it made by the loss each step; Qwen3-8B's untied
    pair 5.0 -> 2.5 GB. Without autocast (fp32 math) the fp32 loss would need a full fp32 copy of
    the head at the step's peak, so fp32 runs keep them fp32. Trained ones stay as they are, and
    NF4 ones (quantize_embeddings) stay NF4."""
    wte, head = model.transformer.wte, model.lm_head
    tied = head.weight is wte.weight
    if not wte.weight.requires_grad and wte.weight.dtype != dtype and not is_nf4(wte.weight):
        model.transformer.wte = FrozenEmbedding.from_pretrained(wte.weight.detach().to(dtype), freeze=True,
                                                                padding_idx=wte.padding_idx)
        if tied:
            head.weight = model.transformer.wte.weight
    if not tied and not head.weight.requires_grad and head.weight.dtype != dtype and not is_nf4(head.weight):
        head.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: ConfigurableGPT) -> ConfigurableGPT:
    """A plain fp32 ConfigurableGPT: the adapters folded into the base they were trained on (an NF4
    base dequantized, exactly as the adapter model computed with it). The input is left unchanged."""
    merged = {f'{n}.weight': m.merged_weight() for n, m in lora_modules(model).items()}
    sd = {}
    for k, v in model.state_dict().items():
        if '.lora_' in k:
            continue
        sd[k] = merged[k] if k in merged else dense(v, torch.float32).clone()
    with torch.device('meta'):
        plain = ConfigurableGPT(model.config)
    plain.load_state_dict(sd, strict=True, assign=True)
    plain.tie_weights()
    return plain


# ---------------------------------------------------------------------- adapter state
def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint stores of the model: the trained tensors only (adapters, DoRA
    magnitudes, fully trained embedding / LM head), by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state_dict(model, sd: dict, where: str = 'adapter') -> None:
    """Load trained tensors into a model that apply_lora prepared with the same config; every
    missing, extra or misshapen tensor is named."""
    params = dict(model.named_parameters())
    want = trainable_names(model)
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        raise LoRAError(f"{where}: adapter tensors do not fit this model's LoRA config: missing "
                        f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
                        f"{extra[:6]}{' ...' if len(extra) > 6 else ''}")
    for k in want:
        if tuple(sd[k].shape) != tuple(params[k].shape):
            raise LoRAError(f"{where}: {k} has shape {tuple(sd[k].shape)}, but this base needs "
                            f"{tuple(params[k].shape)}")
    with torch.no_grad():
        for k in want:
            params[k].copy_(sd[k])


# ---------------------------------------------------------------------- base fingerprint
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().reshape(-1)
    if t.numel() and t.stride(0) != 1:   # a size-1 tensor may keep a stride that view() rejects
        t = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return memoryview(t.view(torch.uint8).numpy())


def base_fingerprint(model) -> dict[str, Any]:
    """sha256 over a base model before apply_lora: every weight's name, shape and values, as fp32
    (so a base loaded in bf16 or fp32 from the same file hashes the same; bf16 -> fp32 is exact).
    A resume or an export against any other base is then caught. QLoRA's NF4 base is a function of
    these weights and the quantizer (whose version the checkpoint records). Cost: one pass over 4
    bytes per weight, ~0.6 s per GiB hashed with SHA-NI on this project's CPU (2.4 s for Qwen3-0.6B)."""
    if getattr(model, 'lora_config', None) is not None:
        raise LoRAError("base_fingerprint takes the base model, before apply_lora")
    h = hashlib.sha256()
    n = 0
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):   # tied: listed once
        h.update(f"{name}:{tuple(p.shape)}\n".encode())
        h.update(_tensor_bytes(p.detach().to('cpu', torch.float32)))
        n += p.numel()
    return {'sha256': h.hexdigest(), 'params': n}


def quantizer_version() -> str:
    from importlib.metadata import version
    return f"torchao {version('torchao')} NF4 block {NF4_BLOCK}"


def frozen_bytes(model) -> dict[str, int]:
    """Bytes each frozen base tensor holds (an NF4 weight: its 4-bit payload and scales)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            parts = [getattr(p, a) for a in p.__tensor_flatten__()[0]] if is_nf4(p) else [p]
            out[name] = sum(t.numel() * t.element_size() for t in parts)
    return out


# ---------------------------------------------------------------------- PEFT adapter directories
def _peft_names(model) -> dict[str, str]:
    """Our trained tensor name -> PEFT's key in adapter_model.safetensors."""
    names = {}
    for path, slices in projection_layout(model).items():
        for s in slices:
            ours = f'{path}.lora_A.{s.target}'
            names[ours] = f'{PEFT_PREFIX}{s.hf_name}.lora_A.weight'
            names[f'{path}.lora_B.{s.target}'] = f'{PEFT_PREFIX}{s.hf_name}.lora_B.weight'
            names[f'{path}.lora_magnitude.{s.target}'] = f'{PEFT_PREFIX}{s.hf_name}.lora_magnitude_vector'
    for target, (ours, hf) in full_module_names(model).items():
        names[f'{ours}.weight'] = f'{PEFT_PREFIX}{hf}.weight'
    return names


def save_peft_adapter(model, path, base_model_name_or_path: str | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained
    loads onto the Hugging Face base. The directory appears complete or not at all."""
    cfg: LoRAConfig = model.lora_config
    config = model.config
    model_type = config.hf_model_type()   # a clear error for an architecture with no HF twin
    adapt, train = resolve_targets(cfg, model)
    names = _peft_names(model)
    tensors = {}
    for k, v in adapter_state_dict(model).items():
        if k == 'lm_head.weight' and config.tie_word_embeddings:
            k = 'transformer.wte.weight'
        tensors[names[k]] = v
    modules_to_save = []
    if train:
        full = full_module_names(model)
        embed_name, embed_hf = next((t, hf) for t, (ours, hf) in full.items() if ours == 'transformer.wte')
        if config.tie_word_embeddings:
            # PEFT keeps tied matrices tied only with ensure_weight_tying; it stores both keys
            modules_to_save = [embed_name]
            tensors[f'{PEFT_PREFIX}lm_head.weight'] = tensors[f'{PEFT_PREFIX}{embed_hf}.weight']
        else:
            modules_to_save = sorted(train)
    tensors = {k: v.detach().to('cpu', dtype or v.dtype).clone(memory_format=torch.contiguous_format)
               for k, v in tensors.items()}
    if config.tie_word_embeddings and modules_to_save:
        # two keys, one storage: safetensors refuses shared memory
        tensors[f'{PEFT_PREFIX}lm_head.weight'] = tensors[f'{PEFT_PREFIX}lm_head.weight'].clone()
    peft_config = {
        'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': cfg.rank, 'lora_alpha': cfg.alpha,
        'lora_dropout': cfg.dropout, 'target_modules': sorted(adapt), 'use_rslora': cfg.rslora,
        'use_dora': cfg.dora, 'modules_to_save': modules_to_save or None,
        'ensure_weight_tying': bool(modules_to_save and config.tie_word_embeddings),
        'bias': 'none', 'fan_in_fan_out': model_type == 'gpt2', 'init_lora_weights': True,
        'inference_mode': True, 'base_model_name_or_path': base_model_name_or_path,
        'rank_pattern': {}, 'alpha_pattern': {}, 'layers_to_transform': None,
    }
    write_dir(path, {'adapter_config.json': peft_config}, {'adapter_model.safetensors': tensors})


_PEFT_UNSUPPORTED = {  # adapter_config.json keys whose non-default values we do not implement
    'rank_pattern': {}, 'alpha_pattern': {}, 'layers_to_transform': None, 'layers_pattern': None,
    'lora_bias': False, 'use_qalora': False, 'trainable_token_indices': None, 'layer_replication': None,
    'exclude_modules': None, 'target_parameters': None, 'alora_invocation_tokens': None,
    'use_bdlora': None, 'kasa_config': None, 'velora_config': None, 'monteclora_config': None,
    'arrow_config': None,
}
# init_lora_weights values that leave the base untouched; PiSSA / OLoRA / CorDA / LoftQ rewrite the base
# weights when PEFT loads the adapter, so their adapters belong to a base nanoSFT never builds
_PEFT_PLAIN_INITS = (True, False, 'gaussian', 'eva', 'orthogonal')


def read_peft_adapter(path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter directory -> (LoRAConfig, its tensors by PEFT key). Features we do not
    implement (per-layer ranks, bias training, embedding adapters, ...) are an error, not ignored."""
    from safetensors.torch import load_file
    path = Path(path)
    cfg_file, weights = path / 'adapter_config.json', path / 'adapter_model.safetensors'
    for f in (cfg_file, weights):
        if not f.is_file():
            raise LoRAError(f"{f}: not found (a PEFT adapter directory has adapter_config.json and "
                            f"adapter_model.safetensors)")
    try:
        pc = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{cfg_file}: not valid JSON: {e}") from e
    if pc.get('peft_type') != 'LORA':
        raise LoRAError(f"{cfg_file}: peft_type {pc.get('peft_type')!r}; only 'LORA' adapters are read")
    if pc.get('bias', 'none') != 'none':
        raise LoRAError(f"{cfg_file}: bias={pc['bias']!r} (trained biases) is not supported; only 'none'")
    for key, default in _PEFT_UNSUPPORTED.items():
        value = pc.get(key, default)
        # by identity and type: peft's layers_to_transform=0 (layer 0 only) == False
        unset = value is None or value is False or value == {} or (value == default and type(value) is type(default))
        if not unset:
            raise LoRAError(f"{cfg_file}: {key}={pc[key]!r} is not supported by nanoSFT's LoRA")
    init = pc.get('init_lora_weights', True)
    if init not in _PEFT_PLAIN_INITS:
        raise LoRAError(f"{cfg_file}: init_lora_weights={init!r} changes the base weights when PEFT loads "
                        f"the adapter; convert it to a plain LoRA adapter first (PEFT's "
                        f"path_initial_model_for_weight_conversion)")
    targets = pc.get('target_modules')
    if isinstance(targets, str) or not targets:
        raise LoRAError(f"{cfg_file}: target_modules={targets!r}: nanoSFT reads a list of module "
                        f"names (q_proj, ...), not a regex or 'all-linear'")
    emb = [t for t in targets if t in ('embed_tokens', 'lm_head', 'wte')]
    if emb:
        raise LoRAError(f"{cfg_file}: LoRA adapters on {emb} are not supported (nanoSFT trains the "
                        f"embedding / LM head in full: modules_to_save)")
    try:
        cfg = LoRAConfig(rank=pc.get('r', 8), alpha=pc.get('lora_alpha', 8),
                         dropout=pc.get('lora_dropout', 0.0) or 0.0,
                         # peft matches modules_to_save by name suffix ('model.embed_tokens')
                         targets=tuple(targets) + tuple(m.rsplit('.', 1)[-1]
                                                        for m in pc.get('modules_to_save') or ()),
                         rslora=bool(pc.get('use_rslora', False)), dora=bool(pc.get('use_dora', False)))
    except LoRAError as e:
        raise LoRAError(f"{cfg_file}: {e}") from e
    return cfg, load_file(weights)


def load_peft_tensors(model, tensors: dict[str, torch.Tensor], where: str = 'adapter') -> None:
    """Load a PEFT adapter's tensors into a model that apply_lora prepared with its config."""
    to_ours = {}
    for ours, peft in _peft_names(model).items():
        to_ours.setdefault(peft, ours)
    tied = model.config.tie_word_embeddings
    full = [f'{PEFT_PREFIX}{hf}.weight' for _, hf in full_module_names(model).values()]
    if tied and sum(k in tensors for k in full) == 1:
        raise LoRAError(f"{where}: trains {next(k for k in full if k in tensors)} alone on a base with tied "
                        f"embeddings (PEFT's modules_to_save without ensure_weight_tying unties them); "
                        f"nanoSFT keeps the embedding and LM head one matrix")
    sd, unknown = {}, []
    for k, v in tensors.items():
        key = k.replace('.lora_A.default.', '.lora_A.').replace('.lora_B.default.', '.lora_B.')
        ours = to_ours.get(key)
        if ours is None:
            unknown.append(k)
        elif not (ours == 'lm_head.weight' and tied):   # tied: the embedding's copy is the one
            sd[ours] = v
    if unknown:
        raise LoRAError(f"{where}: tensors that do not belong to this base: {unknown[:6]}"
                        f"{' ...' if len(unknown) > 6 else ''}")
    load_adapter_state_dict(model, sd, where)


def load_peft_adapter(model, path, **overrides) -> ConfigurableGPT:
    """apply_lora with a PEFT directory's config (fields replaced by overrides, e.g. quantize=True)
    and its tensors: to continue an adapter trained elsewhere, or to use it."""
    cfg, tensors = read_peft_adapter(path)
    cfg = dataclasses.replace(cfg, **overrides)
    apply_lora(model, cfg)
    load_peft_tensors(model, tensors, where=str(path))
    return model
