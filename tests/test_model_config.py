"""ModelArchitectureConfig: presets, dict round trip, validation messages, sizes, HF configs."""
import pytest

from model_config import PRESET_ALIASES, PRESETS, ModelArchitectureConfig


@pytest.mark.parametrize('name', sorted(PRESETS) + sorted(PRESET_ALIASES))
def test_every_preset_round_trips_through_to_dict_and_from_dict(name):
    config = ModelArchitectureConfig.from_preset(name)
    d = config.to_dict()
    assert ModelArchitectureConfig.from_dict(d) == config
    assert ModelArchitectureConfig.from_dict(d).to_dict() == d


def test_nanogpt_model_args_fill_the_rest_with_gpt2_defaults():
    args = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, bias=False, vocab_size=50304,
                dropout=0.1)
    config = ModelArchitectureConfig.from_dict(args)
    assert (config.norm_type, config.pos_encoding, config.mlp_type) == ('layernorm', 'learned', 'gelu')
    assert config.kv_heads == 4 and config.head_size == 32 and config.ffn_size == 512
    assert config.tie_word_embeddings and not config.qkv_bias


def test_unknown_key_error_lists_valid_keys_and_suggests_the_closest():
    with pytest.raises(ValueError) as e:
        ModelArchitectureConfig.from_dict({'n_embed': 64})
    msg = str(e.value)
    assert "'n_embed'" in msg and "did you mean 'n_embd'" in msg and 'valid keys' in msg
    assert 'n_kv_head' in msg and 'rope_theta' in msg


@pytest.mark.parametrize('bad, fragment', [
    (dict(n_head=12, n_kv_head=5), 'multiple of n_kv_head'),
    (dict(n_head=12, n_kv_head=24), 'multiple of n_kv_head'),
    (dict(n_embd=100, n_head=12), 'set head_dim'),
    (dict(norm_type='batchnorm'), "norm_type must be one of 'layernorm', 'rmsnorm'"),
    (dict(pos_encoding='alibi'), 'pos_encoding must be one of'),
    (dict(mlp_type='relu'), 'mlp_type must be one of'),
    (dict(pos_encoding='rope', n_embd=36, n_head=4), 'even head_dim'),
    (dict(dropout=1.5), 'dropout'),
    (dict(n_layer=0), 'n_layer must be >= 1'),
    (dict(n_layer='12'), "'n_layer' must be int"),
    (dict(bias=1), "'bias' must be bool"),
    (dict(n_embd=None), "'n_embd' must not be None"),
])
def test_invalid_values_and_combinations_explain_themselves(bad, fragment):
    with pytest.raises(ValueError, match=fragment.replace('(', r'\(').replace("'", "'")):
        ModelArchitectureConfig.from_dict(bad)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match='qwen3-0.6b'):
        ModelArchitectureConfig.from_preset('qwen4')


def test_qwen3_presets_have_the_published_shapes_and_sizes():
    small = ModelArchitectureConfig.from_preset('qwen3-0.6b')
    assert (small.n_layer, small.n_embd, small.n_head, small.kv_heads, small.head_size,
            small.ffn_size, small.vocab_size) == (28, 1024, 16, 8, 128, 3072, 151936)
    assert small.qk_norm and small.tie_word_embeddings and small.rope_theta == 1e6
    assert round(small.num_params(non_embedding=True) / 1e9, 2) == 0.44   # model card: 0.44B
    assert round(small.num_params(non_embedding=False) / 1e9, 1) == 0.6
    big = ModelArchitectureConfig.from_preset('qwen3-1.8b')
    assert big == ModelArchitectureConfig.from_preset('qwen3-1.7b')
    assert round(big.num_params(non_embedding=True) / 1e9, 1) == 1.4        # model card: 1.4B
    assert round(big.num_params(non_embedding=False) / 1e9, 1) == 1.7
    for name, non_embedding, total in (('qwen3-4b', 3.6, 4.0), ('qwen3-8b', 6.95, 8.19)):   # model cards
        c = ModelArchitectureConfig.from_preset(name)
        assert round(c.num_params(non_embedding=True) / 1e9, 2 if name == 'qwen3-8b' else 1) == non_embedding
        assert round(c.num_params(non_embedding=False) / 1e9, 2 if name == 'qwen3-8b' else 1) == total
    assert not ModelArchitectureConfig.from_preset('qwen3-8b').tie_word_embeddings
    gpt2 = ModelArchitectureConfig.from_preset('gpt2')
    assert round(gpt2.num_params(non_embedding=False) / 1e6) == 124


def test_flops_per_token_is_6n_plus_attention_term():
    c = ModelArchitectureConfig.from_preset('qwen3-1.7b')
    n = c.num_params(non_embedding=True) + c.vocab_size * c.n_embd
    assert c.flops_per_token(2048) == 6 * n + 12 * 28 * 16 * 128 * 2048


def test_tiny_preset_uses_the_qwen_vocabulary_and_qwen3_features():
    t = ModelArchitectureConfig.from_preset('qwen3-tiny')
    assert t == ModelArchitectureConfig.from_preset('tiny')
    assert t.vocab_size == 151936 and t.qk_norm and t.kv_heads < t.n_head
    assert (t.norm_type, t.pos_encoding, t.mlp_type) == ('rmsnorm', 'rope', 'swiglu')


@pytest.mark.parametrize('name, model_type', [('gpt2', 'gpt2'), ('qwen3-0.6b', 'qwen3'), ('tiny', 'qwen3')])
def test_hf_config_round_trip(name, model_type):
    config = ModelArchitectureConfig.from_preset(name)
    hf = config.to_hf_config()
    assert hf['model_type'] == model_type
    assert ModelArchitectureConfig.from_hf_config(hf) == config


def test_qwen2_and_llama_hf_configs_map_their_bias_conventions():
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    q2 = ModelArchitectureConfig.from_hf_config({**base, 'model_type': 'qwen2'})
    assert q2.qkv_bias and not q2.out_bias and not q2.qk_norm and q2.hf_model_type() == 'qwen2'
    ll = ModelArchitectureConfig.from_hf_config({**base, 'model_type': 'llama', 'attention_bias': True})
    assert ll.qkv_bias and ll.out_bias and ll.hf_model_type() == 'llama'
    assert ModelArchitectureConfig.from_hf_config(ll.to_hf_config()) == ll


@pytest.mark.parametrize('extra, fragment', [
    ({'rope_scaling': {'rope_type': 'linear', 'factor': 2.0}}, 'rope scaling'),
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e6}}, 'rope scaling'),
    ({'use_sliding_window': True}, 'sliding'),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
    ({'model_type': 'mistral3'}, 'unsupported Hugging Face model_type'),
])
def test_unsupported_hf_configs_are_rejected_clearly(extra, fragment):
    base = dict(model_type='qwen3', vocab_size=100, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=fragment):
        ModelArchitectureConfig.from_hf_config({**base, **extra})


def test_configs_without_an_hf_counterpart_refuse_export():
    c = ModelArchitectureConfig.from_dict(dict(pos_encoding='rope', norm_type='layernorm'))
    with pytest.raises(ValueError, match='no Hugging Face architecture'):
        c.to_hf_config()
