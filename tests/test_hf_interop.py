"""hf_interop: Hugging Face weights in and out, with transformers' logits as the reference."""
import json

import pytest
import torch

from hf_interop import from_hf, to_hf
from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig

transformers = pytest.importorskip('transformers')

VOCAB = 97


def _hf_models():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=128)
    return {
        'qwen3': ('Qwen3ForCausalLM', Qwen3Config(**common, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=24,
                                                  tie_word_embeddings=True, rope_theta=1e6)),
        'llama': ('LlamaForCausalLM', LlamaConfig(**common, num_attention_heads=4,
                                                  num_key_value_heads=1,
                                                  tie_word_embeddings=False)),
        'qwen2': ('Qwen2ForCausalLM', Qwen2Config(**common, num_attention_heads=4,
                                                  num_key_value_heads=2,
                                                  tie_word_embeddings=False)),
        'gpt2': ('GPT2LMHeadModel', GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32,
                                               n_layer=2, n_head=4, bos_token_id=0,
                                               eos_token_id=0)),
    }


def _random_hf_model(kind):
    arch, config = _hf_models()[kind]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    # random norms and biases too, so a swapped or dropped one cannot go unnoticed
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if 'norm' in name or 'ln' in name
                        else 0.1 * torch.randn_like(p))
    return model


def _ids(T=11, B=2, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('kind', ['qwen3', 'llama', 'qwen2', 'gpt2'])
def test_from_hf_and_to_hf_match_transformers_logits(kind, tmp_path):
    hf = _random_hf_model(kind)
    hf.save_pretrained(tmp_path / 'hf')
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    model = from_hf(tmp_path / 'hf').eval()
    with torch.no_grad():
        ours, _ = model(ids)
    assert (ours - ref).abs().max().item() < 1e-4

    to_hf(model, tmp_path / 'export')
    cfg = json.loads((tmp_path / 'export' / 'config.json').read_text())
    assert cfg['architectures'] == [type(hf).__name__] and cfg['torch_dtype'] == 'float32'
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'export').eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        again = back(ids).logits
    assert (again - ref).abs().max().item() < 1e-4


def test_to_hf_does_not_write_tied_lm_head_and_loads_bf16(tmp_path):
    from safetensors import safe_open
    model = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny', vocab_size=VOCAB))
    to_hf(model, tmp_path / 'out', dtype=torch.bfloat16)
    with safe_open(tmp_path / 'out' / 'model.safetensors', 'pt') as f:
        keys = set(f.keys())
        assert f.get_tensor('model.embed_tokens.weight').dtype == torch.bfloat16
    assert 'lm_head.weight' not in keys
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temp dir left
    again = from_hf(tmp_path / 'out')
    assert again.lm_head.weight is again.transformer.wte.weight


def test_from_hf_reads_one_weight_at_a_time_not_the_whole_checkpoint(tmp_path, monkeypatch):
    """An 8B checkpoint (16 GB of bf16) is never held whole next to the fp32 model it becomes:
    each source tensor is read, converted and dropped before the next is read."""
    import weakref

    import hf_interop
    model = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny', vocab_size=VOCAB, n_layer=4))
    to_hf(model, tmp_path / 'bf16', dtype=torch.bfloat16)
    live, most = weakref.WeakSet(), [0]
    read = hf_interop._HFWeights.__getitem__

    def tracked(self, name):
        t = read(self, name)
        live.add(t)
        most[0] = max(most[0], len(live))
        return t
    monkeypatch.setattr(hf_interop._HFWeights, '__getitem__', tracked)
    loaded = from_hf(tmp_path / 'bf16')
    assert most[0] == 1, most[0]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_from_hf_reads_sharded_safetensors_and_pytorch_bin(tmp_path):
    hf = _random_hf_model('llama')
    hf.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
    assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        assert (from_hf(tmp_path / 'sharded')(ids)[0] - ref).abs().max() < 1e-4
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'config.json').write_text((tmp_path / 'sharded' / 'config.json').read_text())
    torch.save(hf.state_dict(), tmp_path / 'bin' / 'pytorch_model.bin')
    with torch.no_grad():
        assert (from_hf(tmp_path / 'bin')(ids)[0] - ref).abs().max() < 1e-4


def test_from_hf_errors_name_the_path_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='config.json'):
        from_hf(tmp_path)
    hf = _random_hf_model('qwen3')
    hf.save_pretrained(tmp_path / 'm')
    cfg_file = tmp_path / 'm' / 'config.json'
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, 'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}}))
    with pytest.raises(ValueError, match=r'config\.json.*rope'):
        from_hf(tmp_path / 'm')
    cfg_file.write_text(json.dumps({**cfg, 'use_sliding_window': True}))
    with pytest.raises(ValueError, match='sliding'):
        from_hf(tmp_path / 'm')
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / 'm' / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        from_hf(tmp_path / 'm')



@pytest.mark.parametrize('damage', ['lfs_pointer', 'truncated'])
@pytest.mark.parametrize('weights', ['model.safetensors', 'pytorch_model.bin'])
def test_from_hf_names_a_weights_file_that_is_an_lfs_pointer_or_truncated(tmp_path, weights, damage):
    hf = _random_hf_model('qwen3')
    hf.save_pretrained(tmp_path)
    f = tmp_path / weights
    if weights == 'pytorch_model.bin':
        (tmp_path / 'model.safetensors').unlink()
        torch.save(hf.state_dict(), f)
    data = f.read_bytes()
    f.write_bytes(b'version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 4096\n'
                  if damage == 'lfs_pointer' else data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf'{f}: not a .* file \(a Git LFS pointer or an incomplete download\?\)'):
        from_hf(tmp_path)


def test_from_hf_names_a_config_json_or_index_that_is_not_what_it_should_be(tmp_path):
    _random_hf_model('qwen3').save_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text('{"model_type": "qwen3",}')
    with pytest.raises(ValueError, match=rf'{tmp_path / "config.json"}: not valid JSON'):
        from_hf(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps(_random_hf_model('qwen3').config.to_dict()))
    (tmp_path / 'model.safetensors').unlink()
    (tmp_path / 'model.safetensors.index.json').write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: no 'weight_map'"):
        from_hf(tmp_path)


def _tiny():
    torch.manual_seed(0)
    return ConfigurableGPT(ModelArchitectureConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))


def test_to_hf_into_an_existing_directory_keeps_other_files(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'tokenizer_config.json').write_text('{}')
    to_hf(_tiny(), out)
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors',
                                                    'tokenizer_config.json']
