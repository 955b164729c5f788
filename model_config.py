"""ModelArchitectureConfig: every architecture knob of ConfigurableGPT, typed, with defaults.

The defaults are GPT-2 (124M, nanoGPT flavour), so the `model_args` dict of a nanoGPT checkpoint
(n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout) rebuilds the same model.
Presets cover GPT-2 and Qwen3; `from_hf_config` / `to_hf_config` translate Hugging Face
config.json dicts (Qwen3, Qwen2, Llama, GPT-2).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any

NORM_TYPES = ('layernorm', 'rmsnorm')
POS_ENCODINGS = ('learned', 'rope')
MLP_TYPES = ('gelu', 'swiglu')
GELU_APPROXIMATIONS = ('none', 'tanh')   # torch.nn.functional.gelu's `approximate`
ATTENTION_CHOICES = ('auto', 'dense', 'varlen', 'per_doc')   # packed rows' kernels: attention.py


@dataclass
class ModelArchitectureConfig:
    block_size: int = 1024                    # longest sequence (learned positions: table size)
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None              # None -> n_head (MHA); < n_head -> GQA
    n_embd: int = 768
    head_dim: int | None = None               # None -> n_embd // n_head
    intermediate_size: int | None = None      # None -> 4 * n_embd
    dropout: float = 0.0
    bias: bool = True                         # bias on every Linear and LayerNorm (GPT-2)
    attn_qkv_bias: bool | None = None         # None -> bias (Qwen2: True with bias=False)
    attn_out_bias: bool | None = None         # None -> bias (Llama attention_bias=True: True)
    mlp_bias: bool | None = None              # None -> bias
    norm_type: str = 'layernorm'
    norm_eps: float = 1e-5
    pos_encoding: str = 'learned'
    rope_theta: float = 10000.0
    qk_norm: bool = False                     # per-head RMSNorm on q and k (Qwen3)
    mlp_type: str = 'gelu'
    gelu_approximate: str = 'none'            # nanoGPT uses exact GELU; HF GPT-2 'gelu_new' = tanh
    tie_word_embeddings: bool = True
    init_std: float = 0.02                    # weight init when training from scratch
    attention: str = 'auto'                   # packed rows: 'auto' | 'varlen' | 'per_doc' | 'dense'
                                              # (how, not what: every choice computes the same)

    # ----- resolved values (the None defaults spelled out) -----
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def ffn_size(self) -> int:
        return 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size

    @property
    def qkv_bias(self) -> bool:
        return self.bias if self.attn_qkv_bias is None else self.attn_qkv_bias

    @property
    def out_bias(self) -> bool:
        return self.bias if self.attn_out_bias is None else self.attn_out_bias

    @property
    def ffn_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    # ----- dict round trip -----
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'ModelArchitectureConfig':
        """Build from a dict (e.g. a checkpoint's model_args); missing keys take the defaults."""
        if not isinstance(d, dict):
            raise TypeError(f"model_args must be a dict, got {type(d).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), valid, n=1)
                hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ''))
            raise ValueError(f"unknown model config key(s) {', '.join(hints)}; "
                             f"valid keys: {', '.join(valid)}")
        for f in fields(cls):
            if f.name in d:
                _check_type(f.name, f.type, d[f.name])
        types = {f.name: f.type for f in fields(cls)}
        values = {k: float(v) if v is not None and _base_type(types[k]) is float else v
                  for k, v in d.items()}
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> 'ModelArchitectureConfig':
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            names = sorted(PRESETS) + sorted(PRESET_ALIASES)
            raise ValueError(f"unknown model preset '{name}'; known presets: {', '.join(names)}")
        return cls.from_dict({**PRESETS[key], **overrides})

    # ----- validation -----
    def validate(self) -> 'ModelArchitectureConfig':
        """Raise ValueError explaining the first bad value or combination; return self."""
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ('n_kv_head', 'head_dim', 'intermediate_size'):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        for name, allowed in (('norm_type', NORM_TYPES), ('pos_encoding', POS_ENCODINGS),
                              ('mlp_type', MLP_TYPES), ('gelu_approximate', GELU_APPROXIMATIONS),
                              ('attention', ATTENTION_CHOICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if self.kv_heads > self.n_head or self.n_head % self.kv_heads != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.kv_heads}): each key/value head serves a whole group of "
                             f"query heads (GQA)")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head}); "
                             f"set head_dim explicitly (e.g. Qwen3 uses head_dim=128)")
        if self.pos_encoding == 'rope':
            if self.head_size % 2 != 0:
                raise ValueError(f"pos_encoding='rope' needs an even head_dim, got {self.head_size}")
            if self.rope_theta <= 0:
                raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        return self

    # ----- sizes -----
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count of ConfigurableGPT(self) (tied weights once). non_embedding=True leaves
        out the token/position tables and an untied lm_head (Qwen's 'non-embedding' convention)."""
        C, hd, L = self.n_embd, self.head_size, self.n_layer
        q, kv = self.n_head * hd, self.kv_heads * hd
        norm = C * (2 if self.norm_type == 'layernorm' and self.bias else 1)
        attn = C * (q + 2 * kv) + q * C
        attn += (q + 2 * kv) * self.qkv_bias + C * self.out_bias
        attn += 2 * hd * self.qk_norm
        ffn_in = self.ffn_size * (2 if self.mlp_type == 'swiglu' else 1)
        mlp = C * ffn_in + self.ffn_size * C + (ffn_in + C) * self.ffn_bias
        n = L * (2 * norm + attn + mlp) + norm
        if non_embedding:
            return n
        n += self.vocab_size * C * (1 if self.tie_word_embeddings else 2)
        if self.pos_encoding == 'learned':
            n += self.block_size * C
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N + 12*L*H*d*T (PaLM appendix B), N = every weight used in a
        matmul, i.e. the non-embedding parameters plus the lm_head (tied or not)."""
        n = self.num_params(non_embedding=True) + self.vocab_size * self.n_embd
        return 6 * n + 12 * self.n_layer * self.n_head * self.head_size * seq_len

    # ----- Hugging Face config.json -----
    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> 'ModelArchitectureConfig':
        """Translate a Hugging Face config.json dict (model_type qwen3, qwen2, llama or gpt2)."""
        model_type = d.get('model_type')
        if model_type == 'gpt2':
            return _from_hf_gpt2(cls, d)
        if model_type in ('qwen3', 'qwen2', 'llama'):
            return _from_hf_llama_like(cls, d, model_type)
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; "
                         f"supported: qwen3, qwen2, llama, gpt2")

    def hf_model_type(self) -> str:
        """The Hugging Face architecture family that computes exactly what this config computes."""
        if (self.pos_encoding, self.norm_type, self.mlp_type) == ('learned', 'layernorm', 'gelu'):
            if self.qk_norm or self.n_head != self.kv_heads or self.head_dim not in (None, self.n_embd // self.n_head):
                raise ValueError("GPT-2 export needs MHA, no qk_norm and head_dim = n_embd // n_head")
            if not (self.bias and self.qkv_bias and self.out_bias and self.ffn_bias):
                raise ValueError("GPT-2 export needs bias=True on every Linear and LayerNorm")
            if not self.tie_word_embeddings:
                raise ValueError("GPT-2 export needs tie_word_embeddings=True")
            return 'gpt2'
        if (self.pos_encoding, self.norm_type, self.mlp_type) == ('rope', 'rmsnorm', 'swiglu'):
            if self.qk_norm:
                if self.qkv_bias != self.out_bias or self.ffn_bias:
                    raise ValueError("Qwen3 export needs the same bias on q/k/v and o_proj and no MLP bias")
                return 'qwen3'
            if self.qkv_bias and not self.out_bias and not self.ffn_bias:
                if self.head_size * self.n_head != self.n_embd:
                    raise ValueError("Qwen2 export needs head_dim * n_head == n_embd")
                return 'qwen2'
            if self.qkv_bias != self.out_bias:
                raise ValueError("Llama export needs the same bias on q/k/v and o_proj")
            return 'llama'
        raise ValueError(f"no Hugging Face architecture matches pos_encoding={self.pos_encoding!r}, "
                         f"norm_type={self.norm_type!r}, mlp_type={self.mlp_type!r} (supported: "
                         f"learned+layernorm+gelu = GPT-2, rope+rmsnorm+swiglu = Qwen3/Qwen2/Llama)")

    def to_hf_config(self) -> dict[str, Any]:
        mt = self.hf_model_type()
        if mt == 'gpt2':
            return {
                'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
                'vocab_size': self.vocab_size, 'n_positions': self.block_size, 'n_ctx': self.block_size,
                'n_embd': self.n_embd, 'n_layer': self.n_layer, 'n_head': self.n_head,
                'n_inner': self.intermediate_size,
                'activation_function': 'gelu_new' if self.gelu_approximate == 'tanh' else 'gelu',
                'layer_norm_epsilon': self.norm_eps, 'resid_pdrop': self.dropout,
                'embd_pdrop': self.dropout, 'attn_pdrop': self.dropout,
                'initializer_range': self.init_std, 'tie_word_embeddings': True,
            }
        arch = {'qwen3': 'Qwen3ForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'llama': 'LlamaForCausalLM'}[mt]
        out = {
            'architectures': [arch], 'model_type': mt,
            'vocab_size': self.vocab_size, 'hidden_size': self.n_embd,
            'intermediate_size': self.ffn_size, 'num_hidden_layers': self.n_layer,
            'num_attention_heads': self.n_head, 'num_key_value_heads': self.kv_heads,
            'head_dim': self.head_size, 'hidden_act': 'silu',
            'max_position_embeddings': self.block_size, 'rms_norm_eps': self.norm_eps,
            'rope_theta': self.rope_theta,
            'rope_parameters': {'rope_type': 'default', 'rope_theta': self.rope_theta},
            'tie_word_embeddings': self.tie_word_embeddings, 'attention_dropout': self.dropout,
            'initializer_range': self.init_std,
        }
        if mt in ('qwen3', 'llama'):
            out['attention_bias'] = self.qkv_bias
        if mt == 'llama':
            out['mlp_bias'] = self.ffn_bias
        if mt in ('qwen3', 'qwen2'):
            out['use_sliding_window'] = False
        return out


def _base_type(annotation: str):
    # annotations are strings (from __future__ import annotations): 'int | None' -> int
    base = str(annotation).split('|')[0].strip()
    return {'int': int, 'float': float, 'bool': bool, 'str': str}[base]


def _check_type(name: str, annotation: str, value: Any) -> None:
    if value is None:
        if 'None' not in str(annotation):
            raise ValueError(f"model config key '{name}' must not be None")
        return
    want = _base_type(annotation)
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
          isinstance(value, int) and not isinstance(value, bool) if want is int else
          isinstance(value, str))
    if not ok:
        raise ValueError(f"model config key '{name}' must be {annotation}, "
                         f"got {type(value).__name__} {value!r}")


def _rope_theta(d: dict, default: float = 10000.0) -> float:
    params = d.get('rope_parameters') or {}
    scaling = d.get('rope_scaling')
    rope_type = params.get('rope_type', params.get('type', 'default'))
    if scaling or rope_type != 'default':
        raise ValueError(f"rope scaling is not supported (rope_scaling={scaling!r}, "
                         f"rope_parameters={params!r}); only plain RoPE ('default') is")
    theta = d.get('rope_theta', params.get('rope_theta', default))
    return float(theta)


def _from_hf_llama_like(cls, d: dict, model_type: str) -> ModelArchitectureConfig:
    if d.get('hidden_act', 'silu') != 'silu':
        raise ValueError(f"hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
    if d.get('use_sliding_window'):
        raise ValueError("use_sliding_window=True (sliding-window attention) is not supported")
    layer_types = d.get('layer_types') or []
    if any(t != 'full_attention' for t in layer_types):
        raise ValueError(f"layer_types other than 'full_attention' are not supported: {layer_types}")
    n_head = d['num_attention_heads']
    hidden = d['hidden_size']
    attention_bias = bool(d.get('attention_bias', False))
    head_dim = d.get('head_dim') or hidden // n_head
    return cls.from_dict(dict(
        block_size=int(d.get('max_position_embeddings', 2048)),
        vocab_size=d['vocab_size'], n_layer=d['num_hidden_layers'], n_head=n_head,
        n_kv_head=d.get('num_key_value_heads') or n_head, n_embd=hidden,
        head_dim=head_dim, intermediate_size=d['intermediate_size'],
        dropout=float(d.get('attention_dropout', 0.0)), bias=False,
        # None = "same as bias" (False here), so presets and HF configs compare equal
        attn_qkv_bias=True if model_type == 'qwen2' else (attention_bias or None),
        attn_out_bias=attention_bias and model_type != 'qwen2' or None,
        mlp_bias=bool(d.get('mlp_bias', False)) and model_type == 'llama' or None,
        norm_type='rmsnorm', norm_eps=float(d.get('rms_norm_eps', 1e-6)),
        pos_encoding='rope', rope_theta=_rope_theta(d), qk_norm=model_type == 'qwen3',
        mlp_type='swiglu', tie_word_embeddings=bool(d.get('tie_word_embeddings', False)),
        init_std=float(d.get('initializer_range', 0.02)),
    ))


def _from_hf_gpt2(cls, d: dict) -> ModelArchitectureConfig:
    act = d.get('activation_function', 'gelu_new')
    approx = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'none'}.get(act)
    if approx is None:
        raise ValueError(f"GPT-2 activation_function {act!r} is not supported "
                         f"(gelu_new, gelu_pytorch_tanh, gelu)")
    for key in ('scale_attn_by_inverse_layer_idx', 'add_cross_attention'):
        if d.get(key):
            raise ValueError(f"GPT-2 config {key}=True is not supported")
    if d.get('scale_attn_weights') is False:
        raise ValueError("GPT-2 config scale_attn_weights=False is not supported")
    if d.get('tie_word_embeddings') is False:
        raise ValueError("GPT-2 config tie_word_embeddings=False is not supported")
    return cls.from_dict(dict(
        block_size=d.get('n_positions', 1024), vocab_size=d.get('vocab_size', 50257),
        n_layer=d.get('n_layer', 12), n_head=d.get('n_head', 12), n_embd=d.get('n_embd', 768),
        intermediate_size=d.get('n_inner'), dropout=float(d.get('resid_pdrop', 0.0) or 0.0),
        bias=True, norm_type='layernorm', norm_eps=float(d.get('layer_norm_epsilon', 1e-5)),
        pos_encoding='learned', mlp_type='gelu', gelu_approximate=approx,
        tie_word_embeddings=True, init_std=float(d.get('initializer_range', 0.02)),
    ))


_QWEN3 = dict(vocab_size=151936, n_kv_head=8, head_dim=128, bias=False, norm_type='rmsnorm',
              norm_eps=1e-6, pos_encoding='rope', rope_theta=1_000_000.0, qk_norm=True,
              mlp_type='swiglu', tie_word_embeddings=True, block_size=40960)

PRESETS: dict[str, dict[str, Any]] = {
    'gpt2': dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, bias=True,
                 gelu_approximate='tanh'),
    'qwen3-0.6b': dict(_QWEN3, n_layer=28, n_embd=1024, n_head=16, intermediate_size=3072),
    'qwen3-1.7b': dict(_QWEN3, n_layer=28, n_embd=2048, n_head=16, intermediate_size=6144),
    'qwen3-4b': dict(_QWEN3, n_layer=36, n_embd=2560, n_head=32, intermediate_size=9728),
    'qwen3-8b': dict(_QWEN3, n_layer=36, n_embd=4096, n_head=32, intermediate_size=12288,
                     tie_word_embeddings=False),
    # Qwen3-style in miniature: the real Qwen3 vocabulary, so tests can use real tokenizer ids.
    'tiny': dict(_QWEN3, block_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                 intermediate_size=128, rope_theta=10000.0),
}
PRESET_ALIASES = {'qwen3-1.8b': 'qwen3-1.7b', 'qwen3-tiny': 'tiny'}
