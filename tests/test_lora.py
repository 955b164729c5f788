"""lora.py: adapters that start as the identity, train alone, merge exactly (LoRA, DoRA, QLoRA),
round-trip through PEFT, fingerprint their base and reject what does not fit."""
import copy
import json

import pytest
import torch

import lora
from hf_interop import from_hf
from lora import LoRAConfig, LoRAError, apply_lora, merge_lora
from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig

VOCAB = 256


def tiny(**kw):
    # n_embd 128: every projection's element count is a multiple of NF4's 64 x 256 grouping
    arch = dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, head_dim=32, intermediate_size=192,
                vocab_size=VOCAB)
    arch.update(kw)
    torch.manual_seed(0)
    model = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny', **arch)).eval()
    with torch.no_grad():   # non-trivial norms: a dropped or swapped one must show in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(B=2, T=12, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=2, std=0.05):
    """Trained-looking adapters: B (zero at init) and everything else trainable moved at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x)[0]


VARIANTS = {
    'lora': dict(),
    'rslora_dropout': dict(rslora=True, dropout=0.1),
    'dora': dict(dora=True),
    'partial_targets_and_embedding': dict(targets=('q_proj', 'v_proj', 'down_proj', 'embed_tokens')),
    'qlora': dict(quantize=True),
    'qdora': dict(quantize=True, dora=True),
    'qlora_embeddings': dict(quantize=True, quantize_embeddings=True),
    'bf16_base': dict(base_dtype='bfloat16'),
    'bf16_base_partial_targets_dora': dict(base_dtype='bfloat16', targets=('q_proj', 'down_proj'), dora=True),
}


@pytest.mark.parametrize('variant', ['lora', 'rslora_dropout', 'dora', 'partial_targets_and_embedding'])
def test_adapters_at_init_leave_outputs_unchanged(variant):
    base = tiny()
    x = ids()
    ref = logits(base, x)
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, **VARIANTS[variant])).eval()
    out = logits(model, x)
    if variant == 'dora':   # m / ||W|| is 1 up to rounding
        assert (out - ref).abs().max().item() < 1e-5
    else:
        assert torch.equal(out, ref)


def test_qlora_at_init_computes_the_dequantized_nf4_base():
    base = tiny()
    x = ids()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, quantize=True)).eval()
    assert all(lora.is_nf4(m.weight) for m in lora.lora_modules(model).values())
    # the base it computes is the NF4 one: close to the original weights, not equal to them
    plain = merge_lora(model)   # adapters at zero: the dequantized base itself
    assert (logits(model, x) - logits(plain, x)).abs().max().item() < 1e-5
    assert (logits(model, x) - logits(base, x)).abs().max().item() > 1e-3
    w, wq = base.transformer.h[0].attn.c_attn.weight, plain.transformer.h[0].attn.c_attn.weight
    assert (w - wq).abs().max().item() < 0.2 * w.abs().max().item()


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_gradients_reach_adapters_only(variant):
    model = apply_lora(tiny(), LoRAConfig(rank=4, **VARIANTS[variant]))
    perturb(model)
    model.train()
    x = ids()
    _, loss = model(x, labels=x)
    loss.backward()
    trainable = set(lora.trainable_names(model))
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all('lora_' in n or n in ('transformer.wte.weight', 'lm_head.weight') for n in trainable)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    expected = {'lora': 28, 'dora': 42, 'partial_targets_and_embedding': 13}.get(variant)
    if expected:   # 7 projections x 2 layers x (A, B [, magnitude]); or 3 x 2 x 2 + the embedding
        assert len(trainable) == expected


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_merged_model_equals_the_adapter_model(variant):
    model = perturb(apply_lora(tiny(), LoRAConfig(rank=4, **VARIANTS[variant])).eval())
    merged = merge_lora(model)
    assert type(merged) is ConfigurableGPT and not lora.lora_modules(merged)
    assert all(p.dtype == torch.float32 and not lora.is_nf4(p) for p in merged.parameters())
    x = ids()
    assert (logits(model, x) - logits(merged, x)).abs().max().item() < 1e-4


def test_untied_lm_head_can_be_trained_in_full_and_merges():
    model = apply_lora(tiny(tie_word_embeddings=False), LoRAConfig(rank=4, targets=('all', 'lm_head')))
    assert 'lm_head.weight' in lora.trainable_names(model)
    assert 'transformer.wte.weight' not in lora.trainable_names(model)
    perturb(model)
    x = ids()
    assert (logits(model, x) - logits(merge_lora(model), x)).abs().max().item() < 1e-4


def _saved_bytes(model, x):
    """Bytes autograd keeps for backward beyond the parameters themselves, and the loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, labels=x)
    return sum(seen.values()), loss


def test_bf16_base_trains_exactly_like_fp32_on_the_bf16_rounded_base():
    base, x = tiny(), ids()
    rounded = copy.deepcopy(base)
    with torch.no_grad():
        for path in lora.projection_layout(rounded):
            w = rounded.get_submodule(path).weight
            w.copy_(w.to(torch.bfloat16).float())
    half = perturb(apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, base_dtype='bfloat16'))).train()
    full = perturb(apply_lora(rounded, LoRAConfig(rank=4))).train()
    held = lora.frozen_bytes(half)
    for path in lora.projection_layout(half):
        w = half.get_submodule(path).weight
        assert w.dtype == torch.bfloat16 and held[f'{path}.weight'] == 2 * w.numel()
    assert half.transformer.wte.weight.dtype == torch.float32   # the embedding / head as it was
    saved_half, loss_half = _saved_bytes(half, x)
    saved_full, loss_full = _saved_bytes(full, x)
    # each use upcasts the bf16 weight; backward keeps it, not an fp32 copy per layer
    assert saved_half == saved_full
    loss_half.backward()
    loss_full.backward()
    assert torch.equal(loss_half, loss_full)
    grads = {n: p.grad for n, p in full.named_parameters() if p.requires_grad}
    for n, p in half.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-6, msg=n)


@pytest.mark.parametrize('tied', [True, False])
def test_under_bf16_autocast_a_bf16_held_base_and_embedding_compute_exactly_as_the_fp32_one(tied):
    """What train_sft does with lora_base_dtype='auto' under bf16 autocast (CUDA, or a CPU with
    dtype='bfloat16'): projections, embedding and head held in bf16 change nothing but memory."""
    base, x = tiny(tie_word_embeddings=tied), ids()
    with torch.no_grad():   # weights as a bf16 checkpoint ships them
        for p in base.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    labels = x.clone()
    labels[:, :4] = -100
    half = perturb(apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, base_dtype='bfloat16'))).train()
    lora.hold_embeddings_in(half, torch.bfloat16)
    full = perturb(apply_lora(base, LoRAConfig(rank=4))).train()
    assert half.transformer.wte.weight.dtype == half.lm_head.weight.dtype == torch.bfloat16
    assert (half.lm_head.weight is half.transformer.wte.weight) == tied
    held, kept = lora.frozen_bytes(half), lora.frozen_bytes(full)
    assert held['transformer.wte.weight'] == kept['transformer.wte.weight'] // 2
    out = {}
    for name, m in (('half', half), ('full', full)):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            h = m.transformer.wte(x)
            _, loss = m(x, labels=labels)
        loss.backward()
        out[name] = h, loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert out['half'][0].dtype == torch.float32   # the residual stream starts in fp32, as before
    assert torch.equal(out['half'][0], out['full'][0]) and torch.equal(out['half'][1], out['full'][1])
    assert out['half'][2].keys() == out['full'][2].keys()
    for n, g in out['full'][2].items():
        assert torch.equal(out['half'][2][n], g), n
    # trained in full ('embed_tokens'), the embedding stays fp32
    trained = apply_lora(tiny(), LoRAConfig(rank=4, base_dtype='bfloat16', targets=('q_proj', 'embed_tokens')))
    lora.hold_embeddings_in(trained, torch.bfloat16)
    assert trained.transformer.wte.weight.dtype == torch.float32 and trained.transformer.wte.weight.requires_grad


@pytest.mark.parametrize('quantize', [False, True])
def test_a_base_read_as_stored_in_bf16_becomes_the_same_lora_model_as_one_read_in_fp32(tmp_path, quantize):
    """train_sft reads a LoRA base as stored (Qwen3-8B: 16 GB of bf16 in host memory, not 33 GB of
    fp32); apply_lora then gives every weight the dtype the fp32 read would have had."""
    from hf_interop import to_hf
    to_hf(tiny(), tmp_path / 'hf', dtype=torch.bfloat16)
    stored, fp32 = from_hf(tmp_path / 'hf', dtype=None), from_hf(tmp_path / 'hf')
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    assert lora.base_fingerprint(stored) == lora.base_fingerprint(fp32)
    for base_dtype in ('float32', 'bfloat16'):
        cfg = LoRAConfig(rank=4, quantize=quantize, base_dtype=base_dtype)
        a, b = (apply_lora(copy.deepcopy(m), cfg) for m in (stored, fp32))
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and a.lm_head.weight is a.transformer.wte.weight
        for k in sb:
            assert type(sa[k]) is type(sb[k]) and sa[k].dtype == sb[k].dtype, k
            assert torch.equal(lora.dense(sa[k]), lora.dense(sb[k])), k


def test_qlora_frozen_base_is_about_a_quarter_of_its_bf16_bytes():
    model = apply_lora(tiny(), LoRAConfig(rank=4, quantize=True))
    mods = lora.lora_modules(model)
    nbytes = lora.frozen_bytes(model)
    nf4 = sum(nbytes[f'{n}.weight'] for n in mods)
    # 4 bits + an int8 scale per 64 weights + fp32 scale-of-scales per 64 x 256: 0.258 x bf16
    assert 0.25 < nf4 / (2 * sum(m.weight.numel() for m in mods.values())) < 0.27
    assert nbytes['transformer.wte.weight'] == 4 * VOCAB * 128   # the embedding stays as it was


def test_nf4_rows_are_torchaos_dequantization_of_those_rows():
    w = torch.randn(300, 128, generator=torch.Generator().manual_seed(0))
    q = lora.to_nf4(w)   # 600 blocks: scale groups of 200 blocks, not aligned to rows
    full = q.to(torch.float32)   # torchao's own dequantization
    assert torch.equal(lora.nf4_rows(q), full)
    assert torch.equal(lora.nf4_rows(q, slice(17, 251)), full[17:251])
    idx = torch.tensor([[5, 299, 0], [5, 130, 64]])
    assert torch.equal(lora.nf4_rows(q, idx), full[idx])


@pytest.mark.parametrize('tied', [True, False])
def test_quantized_embeddings_compute_the_dequantized_table_and_shrink_the_whole_base(tied, monkeypatch):
    import model_builder
    for mod in (lora, model_builder):   # several head blocks, the last one short
        monkeypatch.setattr(mod, 'HEAD_BLOCK_ROWS', 96)
    base = tiny(tie_word_embeddings=tied)
    q = perturb(apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, quantize=True, quantize_embeddings=True)))
    assert type(q.transformer.wte) is lora.NF4Embedding and type(q.lm_head) is lora.NF4Head
    assert (q.lm_head.weight is q.transformer.wte.weight) == tied
    # the same QLoRA model with the dequantized table(s) held in fp32
    ref = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, quantize=True))
    with torch.no_grad():
        ref.transformer.wte.weight.copy_(lora.dense(q.transformer.wte.weight))
        ref.lm_head.weight.copy_(lora.dense(q.lm_head.weight))
        for (_, a), (_, b) in zip(ref.named_parameters(), q.named_parameters()):
            if b.requires_grad:
                a.copy_(b)
    x = ids()
    labels = x.clone()
    labels[:, :4] = -100
    for m in (ref, q):
        m.train()
        m(x, labels=labels)[1].backward()
    assert abs(ref(x, labels=labels)[1].item() - q(x, labels=labels)[1].item()) < 1e-6
    assert (logits(ref, x) - logits(q, x)).abs().max().item() < 1e-5
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in q.named_parameters():
        assert (p.grad is None) == (n not in grads), n
        if p.grad is not None:
            assert (p.grad - grads[n]).abs().max().item() < 1e-6, n
    # the whole frozen base, table included, against its bytes in bf16
    nbytes = lora.frozen_bytes(q)
    bf16 = 2 * sum(p.numel() for p in base.parameters())
    assert sum(nbytes.values()) / bf16 < 0.3
    assert sum(lora.frozen_bytes(ref).values()) / bf16 > 0.4   # the fp32 table alone: 0.23


def test_compiled_qlora_model_with_an_nf4_table_matches_eager():
    """torch.compile traces the NF4 dequantization (lora.nf4_rows reads torchao's inner tensors)."""
    import torch._dynamo
    torch._dynamo.reset()
    model = perturb(apply_lora(tiny(), LoRAConfig(rank=4, quantize=True, quantize_embeddings=True))).train()
    x = ids()
    _, ref = model(x, labels=x)
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, loss = torch.compile(model, backend='aot_eager')(x, labels=x)   # no C compiler needed
    loss.backward()
    assert loss.item() == ref.item()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if n in grads)
    torch._dynamo.reset()


def test_adapter_init_is_seeded_not_global_rng():
    a = apply_lora(tiny(), LoRAConfig(rank=4), seed=7)
    torch.manual_seed(123)
    b = apply_lora(tiny(), LoRAConfig(rank=4), seed=7)
    sa, sb = lora.adapter_state_dict(a), lora.adapter_state_dict(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_adapter_state_round_trips_into_a_fresh_model():
    model = perturb(apply_lora(tiny(), LoRAConfig(rank=4, dora=True)).eval())
    fresh = apply_lora(tiny(), LoRAConfig(rank=4, dora=True)).eval()
    lora.load_adapter_state_dict(fresh, lora.adapter_state_dict(model))
    x = ids()
    assert torch.equal(logits(model, x), logits(fresh, x))


def test_base_fingerprint_identifies_the_exact_base():
    a = lora.base_fingerprint(tiny())
    assert a == lora.base_fingerprint(tiny())
    assert a == lora.base_fingerprint(tiny().to(torch.float64))   # the values, not the dtype held
    other = tiny()
    with torch.no_grad():
        w = other.transformer.h[1].mlp.c_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1.0))   # one weight, one ulp
    assert lora.base_fingerprint(other)['sha256'] != a['sha256']
    with pytest.raises(LoRAError, match='before apply_lora'):
        lora.base_fingerprint(apply_lora(tiny(), LoRAConfig(rank=4)))


# ---------------------------------------------------------------------- bad input
def test_bad_config_is_a_clear_error():
    with pytest.raises(LoRAError, match='rank must be an integer >= 1'):
        LoRAConfig(rank=0)
    with pytest.raises(LoRAError, match='rank must be an integer >= 1'):
        LoRAConfig(rank=-4)
    with pytest.raises(LoRAError, match='alpha must be > 0'):
        LoRAConfig(alpha=0)
    with pytest.raises(LoRAError, match=r'dropout must be in \[0, 1\)'):
        LoRAConfig(dropout=1.0)
    with pytest.raises(LoRAError, match=r"unknown LoRA target 'qproj'.*'q_proj'"):
        apply_lora(tiny(), LoRAConfig(targets='qproj,v_proj'))
    with pytest.raises(LoRAError, match='float16 on CPU'):
        lora.check_qlora_device(LoRAConfig(quantize=True), torch.float16, 'cpu')
    with pytest.raises(LoRAError, match='already has LoRA adapters'):
        apply_lora(apply_lora(tiny(), LoRAConfig()), LoRAConfig())
    with pytest.raises(LoRAError, match=r"unknown LoRA config key\(s\) \['rnak'\]"):
        LoRAConfig.from_dict({'rnak': 4})
    with pytest.raises(LoRAError, match='quantize_embeddings .* needs QLoRA'):
        LoRAConfig(quantize_embeddings=True)


def test_adapter_for_another_base_shape_is_a_clear_error():
    small = perturb(apply_lora(tiny(), LoRAConfig(rank=4)))
    wide = apply_lora(tiny(intermediate_size=256), LoRAConfig(rank=4))
    with pytest.raises(LoRAError, match=r'c_fc\.lora_B\.gate_proj has shape \(192, 4\), but this base needs \(256, 4\)'):
        lora.load_adapter_state_dict(wide, lora.adapter_state_dict(small), 'run/ckpt.pt')
    other_rank = apply_lora(tiny(), LoRAConfig(rank=8))
    with pytest.raises(LoRAError, match=r'run/ckpt.pt: .*lora_A.q_proj has shape \(4, 128\), but this base needs \(8, 128\)'):
        lora.load_adapter_state_dict(other_rank, lora.adapter_state_dict(small), 'run/ckpt.pt')
    fewer = apply_lora(tiny(), LoRAConfig(rank=4, targets='q_proj'))
    with pytest.raises(LoRAError, match='unexpected'):
        lora.load_adapter_state_dict(fewer, lora.adapter_state_dict(small))


def test_nf4_needs_whole_blocks():
    with pytest.raises(LoRAError, match='has 96 elements, not a multiple of NF4'):
        lora.to_nf4(torch.randn(8, 12), 'w')
    q = lora.to_nf4(torch.randn(6, 64), 'w')   # 6 blocks: the scales are grouped by 6, not 256
    assert q.shape == (6, 64) and lora.is_nf4(q)


# ---------------------------------------------------------------------- PEFT adapter directories
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')


def _hf_base(kind, tmp_path):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                  max_position_embeddings=128)
    arch, config = {
        'qwen3': ('Qwen3ForCausalLM', Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=32, tie_word_embeddings=True)),
        'llama': ('LlamaForCausalLM', LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=1,
                                                  tie_word_embeddings=False)),
        'qwen2': ('Qwen2ForCausalLM', Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                                  tie_word_embeddings=False)),
        'gpt2': ('GPT2LMHeadModel', GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2,
                                               n_head=4)),
    }[kind]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / 'base')
    return tmp_path / 'base'


def _hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


PEFT_CASES = {
    'qwen3': dict(),
    'qwen3_dora_tied_embedding': dict(dora=True, targets=('all', 'embed_tokens')),
    'llama_lm_head_rslora': dict(rslora=True, targets=('q_proj', 'k_proj', 'o_proj', 'up_proj', 'lm_head')),
    'qwen2': dict(dora=True),
    'gpt2': dict(),
}


@pytest.mark.parametrize('case', sorted(PEFT_CASES))
def test_peft_adapter_dir_loads_in_peft_with_the_same_logits(case, tmp_path):
    kind = case.split('_')[0]
    base_dir = _hf_base(kind, tmp_path)
    model = perturb(apply_lora(from_hf(base_dir), LoRAConfig(rank=4, alpha=8, **PEFT_CASES[case])))
    model.eval()
    lora.save_peft_adapter(model, tmp_path / 'adapter', base_model_name_or_path=str(base_dir))
    x = ids(seed=3)
    ours = logits(model, x)
    theirs = peft.PeftModel.from_pretrained(_hf_model(base_dir), tmp_path / 'adapter').eval()
    with torch.no_grad():
        assert (theirs(x).logits - ours).abs().max().item() < 1e-4
    # and back: the directory read as adapters onto a fresh base
    back = lora.load_peft_adapter(from_hf(base_dir), tmp_path / 'adapter').eval()
    assert (logits(back, x) - ours).abs().max().item() < 1e-6


def test_peft_adapter_dir_gets_the_modes_the_umask_gives_not_private_ones(tmp_path):
    import os
    import stat
    model = apply_lora(tiny(), LoRAConfig(rank=2))
    old = os.umask(0o027)
    try:
        lora.save_peft_adapter(model, tmp_path / 'adapter')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'adapter').st_mode) == 0o750
    for name in ('adapter_config.json', 'adapter_model.safetensors'):
        assert stat.S_IMODE(os.stat(tmp_path / 'adapter' / name).st_mode) == 0o640, name


def test_adapter_trained_with_peft_continues_here(tmp_path):
    """A PEFT adapter made by peft itself (its own init, its own names) loads as our adapters."""
    base_dir = _hf_base('qwen3', tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=['q_proj', 'v_proj', 'gate_proj', 'down_proj'],
                          lora_dropout=0.05, use_dora=True, init_lora_weights=False, task_type='CAUSAL_LM')
    pm = peft.get_peft_model(_hf_model(base_dir), cfg).eval()
    pm.save_pretrained(tmp_path / 'theirs')
    x = ids(seed=4)
    ours = lora.load_peft_adapter(from_hf(base_dir), tmp_path / 'theirs').eval()
    assert ours.lora_config.dora and ours.lora_config.dropout == 0.05
    with torch.no_grad():
        assert (pm(x).logits - logits(ours, x)).abs().max().item() < 1e-4
    # continuing it as QLoRA keeps the adapter and quantizes the base
    q = lora.load_peft_adapter(from_hf(base_dir), tmp_path / 'theirs', quantize=True)
    assert all(lora.is_nf4(m.weight) for m in lora.lora_modules(q).values())


def test_peft_modules_to_save_on_a_tied_base_loads_only_when_peft_kept_the_tie(tmp_path):
    """peft's default trains a copy of the embedding and leaves the LM head on the original: two
    matrices where nanoSFT has one (refused); ensure_weight_tying=True keeps one (same logits)."""
    base_dir = _hf_base('qwen3', tmp_path)
    x = ids(seed=4)
    for tie in (True, False):
        cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=['q_proj'], modules_to_save=['embed_tokens'],
                              init_lora_weights=False, task_type='CAUSAL_LM', ensure_weight_tying=tie)
        pm = perturb(peft.get_peft_model(_hf_model(base_dir), cfg)).eval()
        pm.save_pretrained(tmp_path / str(tie))
        if tie:
            ours = lora.load_peft_adapter(from_hf(base_dir), tmp_path / str(tie)).eval()
            with torch.no_grad():
                assert (pm(x).logits - logits(ours, x)).abs().max().item() < 1e-4
        else:
            with pytest.raises(LoRAError, match='alone on a base with tied embeddings'):
                lora.load_peft_adapter(from_hf(base_dir), tmp_path / str(tie))


def test_peft_dir_that_does_not_fit_is_a_clear_error(tmp_path):
    base_dir = _hf_base('qwen3', tmp_path)
    model = perturb(apply_lora(from_hf(base_dir), LoRAConfig(rank=4)))
    lora.save_peft_adapter(model, tmp_path / 'a')
    cfg_file = tmp_path / 'a' / 'adapter_config.json'
    good = json.loads(cfg_file.read_text())
    other = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny', n_embd=128, n_head=4, head_dim=32,
                                                                intermediate_size=256, vocab_size=VOCAB))
    with pytest.raises(LoRAError, match=r'mlp.c_fc.lora_B.gate_proj has shape \(192, 4\), but this base needs \(256, 4\)'):
        lora.load_peft_adapter(other, tmp_path / 'a')
    for change, msg in (({'peft_type': 'IA3'}, "peft_type 'IA3'"),
                        ({'rank_pattern': {'q_proj': 8}}, 'rank_pattern'),
                        ({'target_modules': 'all-linear'}, 'not a regex'),
                        ({'target_modules': ['q_proj', 'embed_tokens']}, 'modules_to_save'),
                        ({'bias': 'all'}, "bias='all'"),
                        ({'layers_to_transform': 0}, 'layers_to_transform=0'),
                        ({'init_lora_weights': 'pissa'}, "init_lora_weights='pissa' changes the base weights"),
                        ({'alora_invocation_tokens': [7]}, 'alora_invocation_tokens'),
                        ({'r': 0}, 'rank must be an integer >= 1')):
        cfg_file.write_text(json.dumps(dict(good, **change)))
        with pytest.raises(LoRAError, match=msg):
            lora.load_peft_adapter(from_hf(base_dir), tmp_path / 'a')
    cfg_file.unlink()
    with pytest.raises(LoRAError, match='adapter_config.json: not found'):
        lora.read_peft_adapter(tmp_path / 'a')
