"""Hugging Face weights in and out of ConfigurableGPT, at the edge of the model.

    model = from_hf('/path/to/Qwen3-1.7B')        # a local Qwen3 / Qwen2 / Llama / GPT-2 directory
    to_hf(model, 'out/hf', dtype=torch.bfloat16)  # transformers.AutoModelForCausalLM loads it

One table (`_weight_map`) names every weight on both sides and says how our fused tensors
([q | k | v] in c_attn, [gate | up] in c_fc, GPT-2's transposed Conv1D) split into theirs; it
serves the import and the export. Nothing here touches the network.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import torch

from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig


def from_hf(path, dtype: torch.dtype | None = torch.float32) -> ConfigurableGPT:
    """Load a local Hugging Face Qwen3 / Qwen2 / Llama / GPT-2 directory (no network). dtype None:
    each weight as stored (a LoRA base read at half the memory of fp32, made fp32 where needed)."""
    path = Path(path)
    config_file = path / 'config.json'
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found (from_hf needs a local Hugging Face "
                                f"model directory with config.json)")
    hf_config = _read_json(config_file)
    try:
        config = ModelArchitectureConfig.from_hf_config(hf_config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{config_file}: {e}") from e
    hf_sd = _HFWeights(path)
    unused = [k for k in hf_sd if k not in hf_sd.expected(config, hf_config['model_type'])
              and not _IGNORED_HF_KEY(k, config)]
    if unused:
        raise ValueError(f"{path}: weights this architecture does not use (unsupported "
                         f"variant?): {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    try:
        sd = _hf_to_ours(config, hf_config['model_type'], hf_sd, dtype)
    except KeyError as e:
        raise ValueError(f"{path}: weight {e.args[0]!r} is missing") from e
    with torch.device('meta'):
        model = ConfigurableGPT(config)
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == 'lm_head.weight')]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the config: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    return model


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding='utf-8'))
    except ValueError as e:   # json's message names a line and column, not the file
        raise ValueError(f"{file}: not valid JSON: {e}") from e


def _index_shards(index: Path) -> list[str]:
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map' of tensor names to shard files")
    return sorted(set(weight_map.values()))


class _HFWeights:
    """The tensors of a local HF directory by name, each read from its file only when asked
    (safetensors: from the memory map, one tensor at a time), so that loading never holds the whole
    checkpoint next to the model it becomes: Qwen3-8B's 16 GB of bf16 plus the fused copies
    would come on top of the 33 GB of the fp32 model."""

    def __init__(self, path: Path):
        single, index = path / 'model.safetensors', path / 'model.safetensors.index.json'
        binary = path / 'pytorch_model.bin'
        self.files: dict[str, object] = {}    # name -> an open safetensors file (or the .bin's dict)
        if single.is_file() or index.is_file():
            from safetensors import SafetensorError, safe_open
            shards = [single.name] if single.is_file() else _index_shards(index)
            for shard in shards:
                if not (path / shard).is_file():
                    raise FileNotFoundError(f"{path / shard}: shard listed in {index} is missing")
                try:
                    f = safe_open(path / shard, framework='pt')
                except SafetensorError as e:   # a header that does not fit the file
                    raise ValueError(f"{path / shard}: not a safetensors file (a Git LFS pointer or an "
                                     f"incomplete download?)") from e
                self.files.update(dict.fromkeys(f.keys(), f))
        elif binary.is_file():   # memory-mapped too: a tensor's pages are read when it is used
            try:
                sd = torch.load(binary, map_location='cpu', weights_only=True, mmap=True)
            except PermissionError:
                raise
            except Exception as e:   # torch's errors for these name neither the file nor the cause
                raise ValueError(f"{binary}: not a PyTorch weights file (a Git LFS pointer or an "
                                 f"incomplete download?)") from e
            self.files.update(dict.fromkeys(sd, sd))
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                                    f"pytorch_model.bin")

    def __iter__(self):
        return iter(self.files)

    def __contains__(self, name):
        return name in self.files

    def __getitem__(self, name):
        f = self.files[name]
        return f[name] if isinstance(f, dict) else f.get_tensor(name)

    def expected(self, config: ModelArchitectureConfig, model_type: str) -> set[str]:
        """The names _hf_to_ours reads (GPT-2 files come with and without 'transformer.')."""
        names = {n for _, ns, _ in _weight_map(config, model_type) for n in ns}
        return names | {n.removeprefix('transformer.') for n in names} if model_type == 'gpt2' else names


def _IGNORED_HF_KEY(key: str, config: ModelArchitectureConfig) -> bool:
    # buffers some exporters write, and a tied lm_head saved anyway
    return (key.endswith(('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq'))
            or (config.tie_word_embeddings and key == 'lm_head.weight'))


def _weight_map(config: ModelArchitectureConfig, model_type: str):
    """(our name, its Hugging Face names, how) for every weight; how is 'copy', 't' (GPT-2's Conv1D
    stores (in, out)) or the row sizes our fused tensor splits into ([q | k | v], [gate | up]).
    One table serves the import and the export."""
    if model_type == 'gpt2':
        yield 'transformer.wte.weight', ['transformer.wte.weight'], 'copy'
        yield 'transformer.wpe.weight', ['transformer.wpe.weight'], 'copy'
        for i in range(config.n_layer):
            o = f'transformer.h.{i}.'
            for name in ('ln_1.weight', 'ln_1.bias', 'ln_2.weight', 'ln_2.bias',
                         'attn.c_attn.bias', 'attn.c_proj.bias', 'mlp.c_fc.bias', 'mlp.c_proj.bias'):
                yield o + name, [o + name], 'copy'
            for name in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'):
                yield o + name + '.weight', [o + name + '.weight'], 't'
        yield 'transformer.ln_f.weight', ['transformer.ln_f.weight'], 'copy'
        yield 'transformer.ln_f.bias', ['transformer.ln_f.bias'], 'copy'
        return
    q, kv, ffn = config.n_head * config.head_size, config.kv_heads * config.head_size, config.ffn_size
    yield 'transformer.wte.weight', ['model.embed_tokens.weight'], 'copy'
    for i in range(config.n_layer):
        p, o = f'model.layers.{i}.', f'transformer.h.{i}.'
        a, m = p + 'self_attn.', p + 'mlp.'
        yield o + 'ln_1.weight', [p + 'input_layernorm.weight'], 'copy'
        yield o + 'ln_2.weight', [p + 'post_attention_layernorm.weight'], 'copy'
        yield o + 'attn.c_attn.weight', [a + f'{n}_proj.weight' for n in 'qkv'], [q, kv, kv]
        if config.qkv_bias:
            yield o + 'attn.c_attn.bias', [a + f'{n}_proj.bias' for n in 'qkv'], [q, kv, kv]
        yield o + 'attn.c_proj.weight', [a + 'o_proj.weight'], 'copy'
        if config.out_bias:
            yield o + 'attn.c_proj.bias', [a + 'o_proj.bias'], 'copy'
        if config.qk_norm:
            yield o + 'attn.q_norm.weight', [a + 'q_norm.weight'], 'copy'
            yield o + 'attn.k_norm.weight', [a + 'k_norm.weight'], 'copy'
        yield o + 'mlp.c_fc.weight', [m + 'gate_proj.weight', m + 'up_proj.weight'], [ffn, ffn]
        yield o + 'mlp.c_proj.weight', [m + 'down_proj.weight'], 'copy'
        if config.ffn_bias:
            yield o + 'mlp.c_fc.bias', [m + 'gate_proj.bias', m + 'up_proj.bias'], [ffn, ffn]
            yield o + 'mlp.c_proj.bias', [m + 'down_proj.bias'], 'copy'
    yield 'transformer.ln_f.weight', ['model.norm.weight'], 'copy'
    if not config.tie_word_embeddings:
        yield 'lm_head.weight', ['lm_head.weight'], 'copy'


def _hf_to_ours(config: ModelArchitectureConfig, model_type: str, hf, dtype=torch.float32) -> dict:
    """Our state dict in `dtype` (None: as stored), built one weight at a time: each source tensor
    is read, converted and dropped before the next, so the peak is the result plus one fused weight."""
    def get(k):  # GPT-2 files exist with and without the 'transformer.' prefix
        t = hf[k.removeprefix('transformer.') if model_type == 'gpt2' and k not in hf else k]
        # a copy even in the stored dtype: a view would keep the whole file mapped (and counted in
        # the process's memory) for as long as the model lives
        return t.to(t.dtype if dtype is None else dtype, copy=True)
    sd = {}
    for ours, names, how in _weight_map(config, model_type):
        if how == 'copy':
            sd[ours] = get(names[0])
        elif how == 't':
            sd[ours] = get(names[0]).t().contiguous()
        else:
            sd[ours] = torch.cat([get(n) for n in names])
    return sd


def _ours_to_hf(config: ModelArchitectureConfig, model_type: str, sd: dict) -> dict:
    hf = {}
    for ours, names, how in _weight_map(config, model_type):
        if how == 'copy':
            hf[names[0]] = sd[ours]
        elif how == 't':
            hf[names[0]] = sd[ours].t()
        else:
            hf.update(zip(names, sd[ours].split(how)))
    return hf


def to_hf(model: ConfigurableGPT, path, dtype=None) -> None:
    """Write config.json + model.safetensors that transformers.AutoModelForCausalLM loads.
    The directory appears complete or not at all (written next to it, then renamed)."""
    config = model.config
    model_type = config.hf_model_type()
    hf_config = config.to_hf_config()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf_sd = _ours_to_hf(config, model_type, sd)
    dtype = dtype or next(iter(hf_sd.values())).dtype
    # clone: split/transposed views share storage, which safetensors must not see
    hf_sd = {k: v.to(device='cpu', dtype=dtype).clone(memory_format=torch.contiguous_format)
             for k, v in hf_sd.items()}
    dtype_name = str(dtype).removeprefix('torch.')
    hf_config['torch_dtype'] = dtype_name
    hf_config['dtype'] = dtype_name
    write_dir(path, {'config.json': hf_config}, {'model.safetensors': hf_sd},
              stale=('model.safetensors.index.json',))


def write_dir(path, json_files: dict, tensor_files: dict, stale=()) -> None:
    """A directory of JSON and safetensors files that appears complete or not at all (written next to
    it, then renamed), with the modes the user's umask gives. Into an existing directory only these
    files are replaced (tokenizer files beside them stay) and `stale` ones removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 would survive the rename and hide the export from other users.
    tmp = path.parent / f'.{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}'
    tmp.mkdir()
    try:
        for name, obj in json_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + '\n')
        for name, tensors in tensor_files.items():
            save_safetensors(tensors, tmp / name, metadata={'format': 'pt'})
        if path.exists():
            for name in (*json_files, *tensor_files):
                os.replace(tmp / name, path / name)
            for name in stale:
                (path / name).unlink(missing_ok=True)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file, then the file modes the user's umask gives: save_file makes every
    file 0600, which a serving container running as another user cannot read."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:   # read without changing it (os.umask would, for a moment, for every thread)
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
