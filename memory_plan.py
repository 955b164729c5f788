"""Will it fit? Per-GPU memory of a training run from its architecture and settings alone, before
renting the GPUs: `python train_sft.py CONFIG --plan [--gpus N] [--gpu_memory_gb G]`.

Counted per GPU, in bytes, the way train_sft trains (fp32 master weights and AdamW states, bf16
autocast, the fused LM-head loss, document-masked attention without a mask):
  weights      the parameters (sharded 1/N under FSDP) + their 16-bit compute copies (autocast's
               weight cache; FSDP's all-gathered blocks and root); LoRA: the frozen base as
               train_sft holds it, projections in bf16 (lora_base_dtype 'bfloat16', or 'auto' under
               bf16 autocast) or fp32 (+ under autocast the 16-bit copies of them that backward
               keeps), the rest fp32; QLoRA: NF4 projections (0.5 byte + block scales). Under bf16
               autocast a bf16 (or NF4) base holds the frozen embedding and LM head in bf16 too.
  gradients    of the trainable parameters (1/N under FSDP) + DDP's bucket copy of them.
  optimizer    AdamW's two fp32 moments per trainable parameter (1/N under FSDP).
  activations  what autograd keeps for backward, per token and layer, from what each op of
               ConfigurableGPT saves (activation_bytes_per_token); checkpointed blocks keep their
               input only and one block is recomputed at a time.
  loss         the fused cross-entropy's chunk of fp32 logits (LOSS_CHUNK_ELEMENTS, worked on in
               place), the selected hidden states and their gradient.
The peak is the largest of four moments of a step: the loss at the end of the forward (all
activations alive), the first block of the backward, the embedding's backward (a second dense
gradient of a tied matrix only where it is 16-bit: FSDP's param_dtype) and the optimizer step
(fused AdamW, CPU and CUDA: no temporaries).
Validated against measured CPU peaks by benchmarks/bench_memory.py (and tests/test_memory_plan.py):
fp32 and CPU bf16 autocast are measured; the CUDA (varlen) and FSDP terms follow the same accounting
but are estimates until a GPU run checks them. Imports only model_config (torch only to read a
checkpoint's model_args).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from model_config import ModelArchitectureConfig

GiB = 2 ** 30
LOSS_CHUNK_ELEMENTS = 2 ** 25        # model_builder.LOSS_CHUNK_ELEMENTS (kept equal by a test)
HEAD_BLOCK_ROWS = 4096               # model_builder.HEAD_BLOCK_ROWS (kept equal by a test)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4 bits + an int8 scale per 64 + an fp32 per 256 scales
# bytes per element lora.nf4_rows allocates for a moment while it dequantizes an NF4 weight for a
# matmul: int32 byte indices (2 per element) and the fp32 output (4). torchao's own took 21.4.
NF4_DEQUANT_BYTES = 6
HF_PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
USABLE_FRACTION = 0.9                # of a GPU's memory: the CUDA context and fragmentation take the rest


@dataclass(frozen=True)
class Setup:
    """One way to train: parallelism, what is trained, activation checkpointing."""
    parallel: str = 'single'         # 'single' | 'ddp' | 'fsdp'
    gpus: int = 1
    finetune: str = 'full'           # 'full' | 'lora' | 'qlora'
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ('all',)
    ac: str = 'none'                 # 'none' | 'full' | 'selective'
    ac_every: int = 2
    lora_base_dtype: str = 'auto'    # LoRA's frozen projections: 'auto' | 'float32' | 'bfloat16'
    quantize_embeddings: bool = False  # QLoRA: the frozen embedding / LM head in NF4 too

    def label(self) -> str:
        par = 'single' if self.parallel == 'single' else f'{self.parallel} x{self.gpus}'
        ft = self.finetune if self.finetune == 'full' else f'{self.finetune} r{self.lora_rank}'
        if self.finetune == 'lora' and self.lora_base_dtype != 'auto':
            ft += f" {'bf16' if self.lora_base_dtype == 'bfloat16' else 'fp32'} base"
        if self.finetune == 'qlora' and self.quantize_embeddings:
            ft += ' nf4 emb'
        ac = f'selective/{self.ac_every}' if self.ac == 'selective' else self.ac
        return f'{par}, {ft}, AC {ac}'


@dataclass
class Plan:
    setup: Setup
    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    phases: dict = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return max(self.phases.values())


# ---------------------------------------------------------------------- sizes
def block_linears(a: ModelArchitectureConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection of one block, by Hugging Face name (LoRA's targets)."""
    C, Q, K, F = a.n_embd, a.n_head * a.head_size, a.kv_heads * a.head_size, a.ffn_size
    out = {'q_proj': (C, Q), 'k_proj': (C, K), 'v_proj': (C, K), 'o_proj': (Q, C), 'down_proj': (F, C)}
    if a.mlp_type == 'swiglu':
        out.update(gate_proj=(C, F), up_proj=(C, F))
    else:
        out.update(up_proj=(C, F))
    return out


def lora_params(a: ModelArchitectureConfig, rank: int, targets=('all',)) -> int:
    """Adapter parameters: rank x (in + out) per targeted projection per layer."""
    lin = block_linears(a)
    chosen = lin if 'all' in targets else {k: v for k, v in lin.items() if k in targets}
    return a.n_layer * sum(rank * (i + o) for i, o in chosen.values())


def activation_bytes_per_token(a: ModelArchitectureConfig, act_bytes: int = 4, path: str = 'per_doc',
                               down_adapted: bool = False) -> float:
    """Bytes autograd saves per token in one block of ConfigurableGPT (training, no dropout).
    act_bytes 4: fp32; 2: 16-bit autocast (matmul inputs/outputs 16-bit, the residual stream,
    norms and RoPE in fp32, as the model computes them). Derived op by op:
      norm: its input (the residual stream; RMSNorm + one 1/rms per row, model_builder._RMSNorm);
      the projection's input (a 16-bit copy under autocast); q|k|v fused output;
      QK-norm: one 1/rms per head (q and k themselves are the q|k|v output); RoPE's rotated q and k;
      attention: its output (per_doc: + the concatenation of the documents' outputs) + logsumexp;
      MLP: fused gate|up output, recomputed silu(gate) * up kept only where a LoRA adapter wraps
      the down projection (down_adapted); GELU: output and gelu(output)."""
    C, Q, K, F, H = a.n_embd, a.n_head * a.head_size, a.kv_heads * a.head_size, a.ffn_size, a.n_head
    lo, f32 = act_bytes, 4
    norm = f32 * (C + 1)                                 # residual input (+ its per-row statistics)
    b = 2 * (norm + lo * C)                              # ln_1 + c_attn input, ln_2 + c_fc input
    b += lo * (Q + 2 * K)                                # fused q|k|v
    if a.qk_norm:
        b += f32 * (H + a.kv_heads)                      # 1/rms of every q and k head
    if a.pos_encoding == 'rope':
        b += lo * (Q + K)                                # rotated q, k (their 16-bit casts)
    b += lo * Q * (2 if path in ('per_doc', 'sdpa') else 1) + f32 * H   # output (+ concat), lse
    if a.mlp_type == 'swiglu':
        b += lo * (3 if down_adapted else 2) * F         # gate|up (+ silu(gate) * up)
    else:
        b += lo * 2 * F
    return b


# ---------------------------------------------------------------------- the plan
def plan(a: ModelArchitectureConfig, setup: Setup, tokens: int, trained_tokens: int | None = None,
         dtype: str = 'bfloat16', device: str = 'cuda', grad_accum: int = 1, path: str | None = None) -> Plan:
    """Memory of one GPU (or the CPU process) for micro-batches of `tokens` tokens (batch_size x
    block_size). trained_tokens defaults to all of them (the LM head's worst case)."""
    N = setup.gpus if setup.parallel == 'fsdp' else 1
    lo = 2 if dtype in ('bfloat16', 'float16') else 4     # under autocast (CUDA or CPU) or fp32
    path = path or ('varlen' if lo == 2 and device == 'cuda' else 'per_doc')   # 'sdpa': padded rows
    trained = tokens if trained_tokens is None else trained_tokens
    C, V, L = a.n_embd, a.vocab_size, a.n_layer
    # lora.resolve_base_dtype's rule: bf16 where autocast would cast every use to bf16 anyway
    held16 = setup.lora_base_dtype == 'bfloat16' or (setup.lora_base_dtype == 'auto' and dtype == 'bfloat16')
    base16 = setup.finetune == 'lora' and held16
    # train_sft's hold_embeddings_in: the frozen embedding and head in bf16 under bf16 autocast
    emb_frozen = setup.finetune != 'full' and not ({'embed_tokens', 'lm_head'} & set(setup.lora_targets))
    emb16 = emb_frozen and held16 and dtype == 'bfloat16'
    # lora.quantize_embeddings: the frozen embedding / head in NF4, the head dequantized by blocks
    emb_nf4 = emb_frozen and setup.finetune == 'qlora' and setup.quantize_embeddings
    emb = V * C                                        # the embedding (= the head when tied)
    head = 0 if a.tie_word_embeddings else V * C
    total = a.num_params(non_embedding=False)
    per_block = sum(i * o for i, o in block_linears(a).values())   # its matmul weights
    if setup.finetune == 'full':
        trainable = total
        weights = 4 * total / N
        if lo == 2:   # 16-bit compute copies: autocast's cache / FSDP's gathered blocks and root
            weights += 2 * (L * per_block if N == 1 else 2 * per_block + emb + head)
    else:
        trainable = lora_params(a, setup.lora_rank, setup.lora_targets)
        proj = L * sum(i * o for i, o in block_linears(a).values())
        base_proj = NF4_BYTES if setup.finetune == 'qlora' else 2 if base16 else 4
        emb_bytes = NF4_BYTES if emb_nf4 else 2 if emb16 else 4
        weights = (base_proj * proj + emb_bytes * (emb + head) + 4 * (total - proj - emb - head)) / N \
            + 4 * trainable / N
        if lo == 2 and N == 1 and setup.finetune == 'lora' and not base16:
            weights += 2 * proj   # autocast does not cache frozen weights: each cast is kept for backward
        if N > 1:
            weights += 2 * (2 * per_block + emb + head)
    grads = 4 * trainable / N
    if setup.parallel == 'ddp':
        grads += 4 * trainable                          # DDP's flat buckets hold a copy
    optimizer = 8 * trainable / N
    head_trained = setup.finetune == 'full'
    # the tied head's gradient is made in the forward by the fused loss (its gradient row above), at
    # full size under FSDP too: the loss works on the gathered weight
    grad_head = 4 * (emb if a.tie_word_embeddings else head) if head_trained else 0
    down_adapted = setup.finetune != 'full' and bool({'all', 'down_proj'} & set(setup.lora_targets))
    per_tok = activation_bytes_per_token(a, lo, path, down_adapted)
    ac_blocks = {'none': 0, 'full': L, 'selective': math.ceil(L / setup.ac_every)}[setup.ac]
    # model level: token ids, positions (int64), RoPE cos/sin, the final norm's input and output
    model_level = 16 + (2 * 4 * a.head_size if a.pos_encoding == 'rope' else 0) + 3 * 4 * C
    activations = tokens * ((L - ac_blocks) * per_tok + ac_blocks * 4 * C + model_level)
    recomputed = tokens * per_tok if ac_blocks else 0   # a checkpointed block, rebuilt in backward
    rows = min(trained, max(1, LOSS_CHUNK_ELEMENTS // V))
    # one chunk of fp32 logits, worked on in place (16-bit: + the matmul's output / the 16-bit
    # softmax for the gradient matmuls); the selected hidden states and their gradient
    loss = (4 if lo == 4 else 6) * rows * V + 2 * 4 * trained * C + (lo * trained * C if lo == 2 else 0)
    if emb_nf4:
        loss += NF4_DEQUANT_BYTES * min(V, HEAD_BLOCK_ROWS) * C   # one dequantized block of the head
    elif lo == 2 and not emb16:
        loss += 2 * emb                                 # the head's 16-bit copy inside the loss
    bw_temp = tokens * 4 * 2 * C                        # the residual stream's gradients
    dequant = 0
    if setup.finetune == 'qlora' or base16 and lo == 4:
        # a backward matmul dequantizes (NF4) or upcasts (bf16 base, no autocast) a fused weight
        sizes = block_linears(a)
        dequant = (NF4_DEQUANT_BYTES if setup.finetune == 'qlora' else 4) * max(
            sum(i * o for k, (i, o) in sizes.items() if k in group)
            for group in (('q_proj', 'k_proj', 'v_proj'), ('gate_proj', 'up_proj'), ('o_proj',), ('down_proj',)))
    grads_in_fwd = grads if grad_accum > 1 else grad_head + (grads - 4 * trainable / N
                                                             if setup.parallel == 'ddp' else 0)
    base = weights + optimizer
    phases = {
        'forward end (loss)': base + grads_in_fwd + activations + loss,
        # a recomputed block's activations, or a dequantized weight: measured not to coincide
        'backward start': base + grads_in_fwd + activations + max(recomputed, dequant) + bw_temp,
        # a tied table's two gradients (head, lookup) coexist only where the table is 16-bit (FSDP's
        # param_dtype); elsewhere the lookup adds its rows into the head's (model_builder._TiedLookup)
        'embedding backward': base + grads + (4 * emb if head_trained and a.tie_word_embeddings
                                              and setup.parallel == 'fsdp' and lo == 2 and device == 'cuda' else 0),
        'optimizer step': base + grads,            # fused AdamW: no temporaries
    }
    return Plan(setup, weights, grads, optimizer, activations, loss, phases)


def alternatives(configured: Setup, gpus: int) -> list[Setup]:
    """The configured setup first, then DDP / FSDP x full / LoRA / QLoRA x AC none / selective / full."""
    pars = ['ddp', 'fsdp'] if gpus > 1 else ['single']
    out = [configured]
    for par in pars:
        for ft in ('full', 'lora', 'qlora'):
            for ac in ('none', 'selective', 'full'):
                s = Setup(par, gpus, ft, configured.lora_rank, configured.lora_targets, ac, configured.ac_every,
                          configured.lora_base_dtype, ft == 'qlora' and configured.quantize_embeddings)
                if s != configured:
                    out.append(s)
    return out


def report(a: ModelArchitectureConfig, configured: Setup, tokens: int, gpu_memory_gb: float,
           dtype: str = 'bfloat16', grad_accum: int = 1, title: str = '', path: str | None = None) -> str:
    """The table `train_sft.py --plan` prints."""
    usable = USABLE_FRACTION * gpu_memory_gb * 1e9
    plans = [plan(a, s, tokens, dtype=dtype, grad_accum=grad_accum, path=path)
             for s in alternatives(configured, configured.gpus)]
    unit, scale = ('GiB', GiB) if plans[0].peak >= GiB else ('MiB', 2 ** 20)
    lines = [title] if title else []
    lines.append(f"memory plan per GPU ({dtype}, {tokens:,} tokens per micro-batch, AdamW), {unit}; "
                 f"fits = peak <= {USABLE_FRACTION:.0%} of {gpu_memory_gb:g} GB")
    head = (f"{'setup':<38}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'loss':>7}"
            f"{'peak':>8}  fits")
    lines += [head, '-' * len(head)]
    for i, p in enumerate(plans):
        mark = '* ' if i == 0 else '  '
        lines.append(f"{mark + p.setup.label():<38}{p.weights / scale:>9.1f}{p.gradients / scale:>8.1f}"
                     f"{p.optimizer / scale:>8.1f}{p.activations / scale:>8.1f}{p.loss / scale:>7.1f}"
                     f"{p.peak / scale:>8.1f}  {'yes' if p.peak <= usable else 'no'}")
    lines.append("* = as configured. Packed rows are planned on the document-masked attention path "
                 "(no T x T mask), padded ones at full length; memory_plan.py says what each column counts.")
    return '\n'.join(lines)


# ---------------------------------------------------------------------- train_sft.py --plan
def plan_args(argv: list[str]) -> tuple[list[str], dict | None]:
    """Take --plan, --gpus N and --gpu_memory_gb G out of argv -> (the rest, the plan's options or
    None without --plan). ValueError names a bad value."""
    rest, opts, planning, i = [], {'gpus': 1, 'gpu_memory_gb': 80.0}, False, 0
    while i < len(argv):
        arg = argv[i]
        key, eq, text = arg[2:].partition('=')
        if arg == '--plan':
            planning = True
        elif arg.startswith('--') and key in opts:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"--{key}: missing value")
                text, i = argv[i + 1], i + 1
            try:
                opts[key] = type(opts[key])(text)
            except ValueError:
                raise ValueError(f"--{key}={text}: expected a number") from None
            if not 0 < opts[key] < math.inf:
                raise ValueError(f"--{key}={text}: must be a number > 0")
        else:
            rest.append(arg)
        i += 1
    if not planning and rest != argv:
        raise ValueError("--gpus and --gpu_memory_gb go with --plan")
    return rest, opts if planning else None


def planned_architecture(cfg, scratch) -> ModelArchitectureConfig:
    """The architecture cfg.init_from would train, read without loading weights (scratch(cfg) builds
    a 'scratch' one). ValueError says what could not be read."""
    from model_config import PRESETS
    init = cfg.init_from
    try:
        if init == 'scratch':
            return scratch(cfg)
        if init.startswith('hf:'):
            path = os.path.join(init[3:], 'config.json')
            # planning comes before the download: a directory named after a preset plans the preset
            name = os.path.basename(os.path.normpath(init[3:])).lower().removesuffix('-base')
            if not os.path.exists(path) and name in PRESETS:
                print(f"--plan: {path} not found; planning the '{name}' preset the directory is named after")
                return ModelArchitectureConfig.from_preset(name)
            with open(path) as f:
                return ModelArchitectureConfig.from_hf_config(json.load(f))
        import torch
        path = os.path.join(cfg.out_dir, 'ckpt.pt') if init == 'resume' else init
        return ModelArchitectureConfig.from_dict(torch.load(path, map_location='cpu', mmap=True,
                                                            weights_only=False)['model_args'])
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"--plan: cannot read the architecture of init_from={init}: {e} (or plan a "
                         f"preset: --init_from=scratch --model_preset=NAME)") from e


def report_for_config(cfg, a: ModelArchitectureConfig, gpus: int, gpu_memory_gb: float) -> str:
    """The --plan table for a train_sft.TrainConfig (read by attribute; LoRA keys when present)."""
    targets = getattr(cfg, 'lora_targets', 'all')
    setup = Setup(parallel=cfg.parallel if gpus > 1 else 'single', gpus=gpus,
                  finetune=getattr(cfg, 'finetune', 'full'), lora_rank=getattr(cfg, 'lora_rank', 16),
                  lora_targets=tuple(targets.split(',') if isinstance(targets, str) else targets),
                  ac=cfg.activation_checkpointing, ac_every=cfg.activation_checkpointing_every,
                  lora_base_dtype=getattr(cfg, 'lora_base_dtype', 'auto'),
                  quantize_embeddings=getattr(cfg, 'lora_quantize_embeddings', False))
    dtype = {'bf16': 'bfloat16', 'fp16': 'float16', 'fp32': 'float32', '': 'bfloat16'}.get(cfg.dtype, cfg.dtype)
    name = cfg.init_from if cfg.init_from != 'scratch' else cfg.model_preset
    n = a.num_params(non_embedding=False)
    size = f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.1f}M'
    title = (f"{name}: {size} parameters, {a.n_layer} layers x "
             f"{a.n_embd}, vocab {a.vocab_size:,}; {cfg.batch_size} rows x {cfg.block_size} tokens per "
             f"micro-step, {cfg.gradient_accumulation_steps} micro-steps, {gpus} GPU(s)")
    return report(a, setup, cfg.batch_size * cfg.block_size, gpu_memory_gb, dtype=dtype,
                  grad_accum=cfg.gradient_accumulation_steps, title=title,
                  path=None if cfg.packing else 'sdpa')
