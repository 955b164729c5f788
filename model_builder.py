"""ConfigurableGPT: one decoder-only transformer that is GPT-2, Llama, Qwen2 or Qwen3 by config.

Parameter names follow nanoGPT (transformer.wte / .h.N.attn.c_attn / lm_head ...), so nanoGPT
checkpoints load as they are. q, k and v share one fused c_attn Linear ([q | k | v] rows); the
SwiGLU MLP fuses gate and up into c_fc ([gate | up] rows). Hugging Face weights are converted at
the edge (hf_interop.py); the model itself knows nothing of devices, DDP or file formats.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import Documents, document_attention, packed_documents
from model_config import ModelArchitectureConfig

ACTIVATION_CHECKPOINTING = ('none', 'full', 'selective')

# Logits elements (rows x vocab) the LM head + cross-entropy materialize at once in training:
# 2**25 fp32 = 128 MiB, i.e. 220 rows at Qwen's 151,936 vocab, everything at once for a tiny vocab.
LOSS_CHUNK_ELEMENTS = 2 ** 25
# A head held compressed (QLoRA's NF4 table) is made dense this many rows at a time: 16 MiB of fp32
# at width 1024.
HEAD_BLOCK_ROWS = 4096


# ---------------------------------------------------------------------- loss
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) without the (N, vocab) logits: chunk by chunk, and when gradients
    are needed they are computed right there in the forward (softmax - onehot is the logits' grad),
    so a chunk's logits live for one chunk and nothing is recomputed in backward (as Liger's fused
    linear cross-entropy does). Under autocast the matmuls run in the autocast dtype and the softmax
    in fp32, like F.linear + F.cross_entropy(logits.float()) would. A frozen head held compressed
    (QLoRA's NF4 table) comes as dense_rows(start, end, dtype), made dense a block of rows at a time."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, grad_enabled, dense_rows, table_grad):
        # needs_input_grad ignores no_grad(), so the caller says whether grads can be wanted
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        if dense_rows is not None and want_w:
            raise ValueError("a head given as dense_rows is frozen: it gets no gradient")
        dev = h.device.type
        dtype = compute_dtype(h)
        V = weight.shape[0]
        blocks = [(a, min(a + HEAD_BLOCK_ROWS, V)) for a in range(0, V, HEAD_BLOCK_ROWS)]
        with torch.autocast(dev, enabled=False):
            hc_all = h.to(dtype)
            w = weight.to(dtype) if dense_rows is None else None
            grad_h = torch.empty_like(h) if want_h else None
            # fp32 accumulation over chunks even for bf16 weights (FSDP's param_dtype)
            acc = torch.promote_types(weight.dtype, torch.float32)
            grad_w = None
            fp = torch.promote_types(dtype, torch.float32)   # softmax and loss at >= fp32
            loss = torch.zeros((), dtype=fp, device=h.device)
            for s in range(0, h.shape[0], chunk_rows):
                hc, tc = hc_all[s:s + chunk_rows], targets[s:s + chunk_rows]
                # one (rows, vocab) buffer per chunk, everything in place (logsumexp would add a
                # second): e = exp(logits - max), loss = max + log(sum e) - target logit
                if w is not None:
                    e = (hc @ w.t()).to(fp)
                else:
                    e = hc.new_empty(len(hc), V, dtype=fp)
                    for a, b in blocks:
                        e[:, a:b] = hc @ dense_rows(a, b, dtype).t()
                target = e.gather(1, tc[:, None]).squeeze(1)
                top = e.amax(dim=-1, keepdim=True)
                z = e.sub_(top).exp_().sum(dim=-1, keepdim=True)
                loss += (top + z.log()).squeeze(1).sub_(target).sum()
                if want_h or want_w:
                    p = e.div_(z)                                      # softmax, in place
                    p.scatter_add_(1, tc[:, None], p.new_full((len(tc), 1), -1.0))  # d(CE sum)/d(logits)
                    p = p.to(dtype)
                    if want_h and w is not None:
                        grad_h[s:s + chunk_rows] = p @ w
                    elif want_h:
                        gh = grad_h[s:s + chunk_rows].zero_()
                        for a, b in blocks:
                            gh.addmm_(p[:, a:b], dense_rows(a, b, dtype))
                    if want_w:
                        if grad_w is None:   # the first product itself, not zeros + it (a V x C pass)
                            grad_w = (p.t() @ hc).to(acc)
                        elif grad_w.dtype == dtype:
                            grad_w.addmm_(p.t(), hc)
                        else:
                            grad_w += (p.t() @ hc).to(grad_w.dtype)
                e = p = None   # freed before the next chunk's logits, not after them
        ctx.save_for_backward(grad_h, grad_w)
        ctx.used, ctx.weight_dtype, ctx.table_grad = False, weight.dtype, table_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:  # the saved gradients are scaled in place below
            raise RuntimeError("linear_cross_entropy supports one backward per forward "
                               "(no retain_graph=True double backward)")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss.to(grad_w.dtype)).to(ctx.weight_dtype)
            if ctx.table_grad is not None:   # the tied lookup's backward finishes it (_TiedLookup)
                ctx.table_grad['weight'], grad_w = grad_w, None
        return grad_h, grad_w, None, None, None, None, None


class _TiedLookup(torch.autograd.Function):
    """weight[ids] for the table the LM head shares. Autograd would give the table two
    vocab x width gradients, the head's and the lookup's, and hold both at once at the end of
    backward to add them (+445 MiB at a 151,936 x 768 fp32 table, the step's peak on CPU). Here the
    fused loss leaves its gradient in table_grad and this backward adds the looked-up rows into it:
    one buffer, handed to autograd whole (DDP and FSDP see one gradient, as before)."""

    @staticmethod
    def forward(ctx, ids, weight, table_grad):
        ctx.save_for_backward(ids)
        ctx.table_grad, ctx.table_shape = table_grad, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        ids, = ctx.saved_tensors
        grad = ctx.table_grad.pop('weight', None)
        if grad is None:   # the loss had no trained token, so no head gradient: the rows alone
            grad = grad_out.new_zeros(ctx.table_shape)
        ids, rows = ids.reshape(-1), grad_out.reshape(-1, grad.size(1)).to(grad.dtype)
        # repeated ids summed in a fixed order, as autograd's embedding backward does (resumes stay
        # bit-exact): index_add_ is serial per row on CPU but uses atomics on CUDA, where
        # index_put_(accumulate=True) sorts first (and on CPU is the one that races)
        if grad.is_cuda:
            grad.index_put_((ids,), rows, accumulate=True)
        else:
            grad.index_add_(0, ids, rows)
        return None, grad, None


def linear_cross_entropy(h, weight, targets, chunk_rows: int | None = None, dense_rows=None, table_grad=None):
    """F.cross_entropy(F.linear(h, weight).float(), targets, reduction='sum') (h: (N, C), targets: (N,),
    all valid) holding at most LOSS_CHUNK_ELEMENTS logits at a time. One backward per forward.
    dense_rows(start, end, dtype): the frozen weight's rows, for a weight held compressed.
    table_grad: the dict of a _TiedLookup of this weight, which then receives the weight's gradient."""
    if chunk_rows is None:
        chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows, torch.is_grad_enabled(), dense_rows,
                                     table_grad)


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into the (B*T) positions of the positions whose next label is trained (the
    targets are labels shifted by one: position b*T+t predicts labels[b, t+1])."""
    has_target = torch.zeros_like(labels, dtype=torch.bool)
    has_target[:, :-1] = labels[:, 1:] != -100
    return has_target.flatten().nonzero().squeeze(1)


class _RMSNorm(torch.autograd.Function):
    """weight * rms_norm(x in fp32).to(x.dtype), keeping for backward x (which autograd keeps anyway:
    the residual stream, or q / k) and one 1/rms per row. Autograd's composite rms_norm would also
    keep the normalized x, n_embd fp32 per token per norm (q and k too with QK-norm): recomputed in
    backward instead, by one multiply. The forward is HF's arithmetic, op for op."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        n = x.float() * rstd   # the normalized x, recomputed
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * n.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        # as autograd would: the product's gradient cast to x's dtype, then back to fp32
        grad_n = (grad * weight).to(x.dtype).float()
        # d(x * rstd)/dx with rstd = mean(x^2)^-1/2: rstd * (grad_n - n * mean(grad_n * n))
        grad_x = (grad_n - n * (grad_n * n).mean(-1, keepdim=True)).mul_(rstd)
        return grad_x.to(x.dtype), grad_w, None


class RMSNorm(nn.Module):
    """Normalizes in fp32 and scales in the input dtype, exactly like HF Llama/Qwen RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _RMSNorm.apply(x, self.weight, self.eps)


def make_norm(config: ModelArchitectureConfig, dim: int) -> nn.Module:
    if config.norm_type == 'rmsnorm':
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, T) positions -> cos, sin of shape (B, T, 1, head_dim) (for (B, T, heads, head_dim) q and k),
    computed in fp32 like HF."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.int64).float() / head_dim))
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def apply_rope(x, cos, sin):
    # HF 'rotate_half' convention (halves, not interleaved pairs), so HF weights need no permutation
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values for every layer; `pos` = number of positions already filled."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.kv_heads, max_len, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0

    def update(self, layer, k, v):
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelArchitectureConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        self.q_size, self.kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.c_proj = nn.Linear(self.q_size, config.n_embd, bias=config.out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache: KVCache | None, docs: Documents | None = None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout = self.dropout if self.training else 0.0
        if docs is not None:   # packed documents: token-major (B*T, heads, head_dim), no mask
            y = document_attention(q.reshape(B * T, self.n_head, self.head_dim),
                                   k.reshape(B * T, self.n_kv_head, self.head_dim),
                                   v.reshape(B * T, self.n_kv_head, self.head_dim), docs, dropout)
            return self.resid_dropout(self.c_proj(y.view(B, T, self.q_size)))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = self.n_kv_head != self.n_head
        if gqa and mask is not None:
            # SDPA's enable_gqa is served only by the flash and math kernels on CUDA; flash takes
            # no mask, so with a mask expand k/v and keep the memory-efficient kernel in play
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=dropout, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.q_size)
        return self.resid_dropout(self.c_proj(y))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of h = [gate | up], then the down projection when its weight is given,
    keeping only h for backward. Autograd would also keep silu(gate) (half of h again) and the
    product (the down projection's input, half again): together 3 F per token where h is 2 F. Both
    are recomputed in backward with autograd's own kernels, in its order (bit-identical results
    in fp32 and under autocast); a pointwise pass, no matmul, so no slower."""

    @staticmethod
    def forward(ctx, h, weight=None, bias=None):
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate).mul_(up)
        ctx.has_proj = weight is not None
        if not ctx.has_proj:
            ctx.save_for_backward(h)
            return a
        dtype = compute_dtype(a)   # as F.linear under autocast: the weight in the autocast dtype
        w = weight.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            out = F.linear(a, w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(h, w)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        h, *w = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_w = grad_b = None
        if ctx.has_proj:
            g2 = grad.reshape(-1, grad.size(-1))
            if ctx.needs_input_grad[1]:
                a = F.silu(gate).mul_(up)
                grad_w = g2.t().mm(a.reshape(-1, a.size(-1))).to(ctx.dtypes[0])
                a = None
            if ctx.needs_input_grad[2]:
                grad_b = g2.sum(0).to(ctx.dtypes[1])
            grad = grad.matmul(w[0])
        grad_h = torch.empty_like(h)
        d_gate, d_up = grad_h.chunk(2, dim=-1)
        # autograd's own kernels, in the order it would run them (the same rounding in every dtype),
        # written in place into the output: no temporaries at the backward's peak
        torch.ops.aten.silu_backward.grad_input(torch.mul(grad, up, out=d_gate), gate, grad_input=d_gate)
        torch.ops.aten.silu.out(gate, out=d_up).mul_(grad)
        return grad_h, grad_w, grad_b


class MLP(nn.Module):
    def __init__(self, config: ModelArchitectureConfig):
        super().__init__()
        self.swiglu = config.mlp_type == 'swiglu'
        self.approximate = config.gelu_approximate
        hidden = config.ffn_size
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.ffn_bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.ffn_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu and type(self.c_proj) is nn.Linear:   # not a LoRA-wrapped projection
            return self.dropout(_SwiGLU.apply(h, self.c_proj.weight, self.c_proj.bias))
        if self.swiglu:
            h = _SwiGLU.apply(h)
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: ModelArchitectureConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, cache=None, docs=None):
        x = x + self.attn(self.ln_1(x), rope, mask, cache, docs)
        return x + self.mlp(self.ln_2(x))


class ConfigurableGPT(nn.Module):
    def __init__(self, config: ModelArchitectureConfig):
        super().__init__()
        config.validate()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_encoding == 'learned':
            modules['wpe'] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                       ln_f=make_norm(config, config.n_embd))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))
        self.checkpoint_every = 0   # activation checkpointing: see set_activation_checkpointing

    def set_activation_checkpointing(self, mode: str = 'none', every: int = 2):
        """Recompute blocks in backward instead of keeping their activations (training only).
        'full': every block keeps only its input (n_embd per token), ~1/3 more compute; 'selective':
        blocks 0, every, 2*every, ... only. Block level (covers LoRA adapters inside), non-reentrant
        torch.utils.checkpoint (compile, DDP, FSDP2); dropout masks replay: results unchanged."""
        if mode not in ACTIVATION_CHECKPOINTING or every < 1:
            raise ValueError(f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING} "
                             f"(every k >= 1 blocks), got {mode!r}, every={every}")
        self.checkpoint_every = {'none': 0, 'full': 1, 'selective': every}[mode]

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, 'bias', None) is not None:
                nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding: bool = True) -> int:
        return self.config.num_params(non_embedding=non_embedding)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, doc_ids=None, cache=None,
                      cu_seqlens=None, max_seqlen=None, table_grad=None):
        """Final-norm hidden states (B, T, n_embd). Packed documents: see forward."""
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.pos if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        x = self._embed(input_ids, table_grad)
        rope = None
        if self.config.pos_encoding == 'learned':
            if past + T > self.config.block_size:  # checked on the host: no device sync
                raise ValueError(f"sequence length {past + T} exceeds block_size "
                                 f"{self.config.block_size} (learned position embeddings)")
            x = x + self.transformer.wpe(position_ids)
        else:
            rope = rope_cos_sin(position_ids, self.config.head_size, self.config.rope_theta, x.dtype)
        x = self.transformer.drop(x)
        mask, docs = None, None
        if (doc_ids is not None or cu_seqlens is not None) and attn_mask is None and cache is None:
            mask, docs = packed_documents(self.config.attention, B, T, doc_ids, cu_seqlens, max_seqlen, device)
        else:
            mask = self._attention_mask(B, T, past, attn_mask, device)
        every = self.checkpoint_every if cache is None and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.transformer.h):
            if every and i % every == 0:
                x = checkpoint(block, x, rope, mask, None, docs, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, docs)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    # Eager under torch.compile: the lookup's backward reads what the loss's backward left in a dict.
    @torch._disable_dynamo
    def _embed(self, input_ids, table_grad):
        if table_grad is None:
            return self.transformer.wte(input_ids)
        return _TiedLookup.apply(input_ids, self.transformer.wte.weight, table_grad)

    def _table_grad(self) -> dict | None:
        """A dict for the head's gradient to wait in for the lookup's rows (_TiedLookup) when one
        fp32 table is both and is trained; None otherwise (autograd adds the two as usual). A 16-bit
        table (FSDP's param_dtype) keeps autograd's path and its fp32 accumulation of the rows."""
        wte = self.transformer.wte
        w = wte.weight
        if (type(wte) is nn.Embedding and w is self.lm_head.weight and w.requires_grad
                and w.dtype == torch.float32 and torch.is_grad_enabled()):
            return {}
        return None

    @staticmethod
    def _attention_mask(B, T, past, attn_mask, device):
        """None (SDPA's is_causal fast path) or a bool (B|1, 1, T, past+T) mask, True = attend."""
        if attn_mask is None and past == 0:
            return None
        S = past + T
        q_pos = torch.arange(past, S, device=device)
        mask = (torch.arange(S, device=device)[None, :] <= q_pos[:, None])[None, None]
        if attn_mask is not None:
            mask = mask & attn_mask.to(device=device, dtype=torch.bool)
            # a query that may attend to nothing (a left-pad slot) gives NaN in SDPA, and the NaN
            # would leak through the values; letting it see itself keeps everything finite
            mask = mask | (torch.arange(S, device=device)[None, :] == q_pos[:, None])[None, None]
        return mask

    def forward(self, input_ids, labels=None, position_ids=None, attn_mask=None, doc_ids=None,
                reduction='mean', return_logits=None, trained_index=None, cu_seqlens=None,
                max_seqlen=None):
        """-> (logits, loss). Labels are shifted inside (HF convention), -100 ignored; with labels the
        LM head runs on trained positions only and logits are None unless return_logits. attn_mask
        (bool, broadcastable to (B,1,T,T), True = may attend) joins the causal mask. Packed rows:
        doc_ids (B, T) and/or cu_seqlens (int32 document offsets in the flattened B*T tokens) with
        max_seqlen keep attention inside each document (attention.py). cu_seqlens and trained_index
        (= trained_positions(labels)) made on the host, as sft_data does, cost no device sync."""
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        table_grad = self._table_grad() if labels is not None else None
        h = self.hidden_states(input_ids, position_ids, attn_mask, doc_ids, None, cu_seqlens, max_seqlen,
                               table_grad)
        if labels is None:
            return self.lm_head(h), None
        logits = self.lm_head(h) if return_logits else None
        return logits, self._chunked_loss(h, labels, reduction, trained_index, table_grad)

    # Eager under torch.compile: the trained-position count changes every batch, and compiling
    # per count would recompile until the cache limit; the chunks are big matmuls anyway. (Lazy
    # torch.compiler.disable: see attention._per_doc.)
    @torch._disable_dynamo
    def _chunked_loss(self, h, labels, reduction, trained_index=None, table_grad=None):
        if trained_index is None:
            trained_index = trained_positions(labels)
        n = trained_index.numel()
        if n == 0:   # exactly 0, and every trainable weight still gets a (zero) gradient: DDP and
            # FSDP expect one on each rank, and an untied head is not reached through h
            return (h.sum() + sum(p.sum() for p in self.lm_head.parameters() if p.requires_grad)) * 0.0
        # (N, C): only the positions whose next token is trained; their targets are one further on
        h_sel = h.reshape(-1, h.size(-1)).index_select(0, trained_index)
        t_sel = labels.reshape(-1).index_select(0, trained_index + 1)
        total = linear_cross_entropy(h_sel, self.lm_head.weight, t_sel,
                                     dense_rows=getattr(self.lm_head, 'dense_rows', None), table_grad=table_grad)
        return total / n if reduction == 'mean' else total

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay matrices and embeddings only; norms and biases (1-D) are left alone
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        # fused: one pass over each tensor. On CPU it took 0.35 CPU-s per step for 199M parameters
        # where foreach took 2.2 (2-core EPYC), and it needs no parameter-sized temporary.
        extra = {'fused': True} if device_type in ('cuda', 'cpu') else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), **extra)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_ids=(), use_cache=True, generator=None,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Sample up to max_new_tokens per prompt; returns the new tokens of each prompt (ending with
        the stop id when one was hit). Prompts of different lengths are left-padded, with position
        ids restarting at 0 at each prompt's first real token and pad slots masked out."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
        device = self.lm_head.weight.device
        B, T0 = len(prompts), max(len(p) for p in prompts)
        total = T0 + max_new_tokens
        if self.config.pos_encoding == 'learned' and total > self.config.block_size:
            raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"block_size {self.config.block_size}")
        stop = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long, device=device)
        ids = torch.zeros(B, total, dtype=torch.long, device=device)
        valid = torch.zeros(B, total, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            ids[i, T0 - len(p):T0] = torch.tensor(p, device=device)
            valid[i, T0 - len(p):] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        padded = bool((~valid[:, :T0]).any())
        cache = None
        if use_cache:
            cache = KVCache(self.config, B, total, device, self.lm_head.weight.dtype)
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cur = T0
        for step in range(max_new_tokens):
            if use_cache:
                start = 0 if step == 0 else cur - 1
            else:
                start = 0
            key_mask = valid[:, None, None, :cur] if padded else None
            h = self.hidden_states(ids[:, start:cur], positions[:, start:cur], attn_mask=key_mask,
                                   cache=cache)
            logits = self.lm_head(h[:, -1]).float()
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)
            ids[:, cur] = nxt
            cur += 1
            for i, tok in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(tok)
                    if on_token is not None:
                        on_token(i, tok)
            if stop.numel():
                done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
        return out


def sample_next(logits, temperature, top_k, top_p, generator):
    """(B, V) fp32 logits -> (B,) token ids. temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float('-inf'))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
