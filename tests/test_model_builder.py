"""ConfigurableGPT: loss, masking, generation, optimizer groups."""
import pytest
import torch
import torch.nn.functional as F

import model_builder
from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig

VOCAB = 97


def _ids(T=11, B=2, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- loss
def _tiny(**overrides):
    torch.manual_seed(0)
    return ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny', vocab_size=VOCAB, **overrides))


def _full_logits_loss(model, ids, labels, reduction):
    """The unoptimized reference: every position's logits, then F.cross_entropy with ignore_index."""
    logits, _ = model(ids)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                            labels[:, 1:].reshape(-1), ignore_index=-100, reduction='sum')
    return total / (labels[:, 1:] != -100).sum() if reduction == 'mean' else total


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('tie', [True, False])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
@pytest.mark.parametrize('chunk_rows', [1, 7, 64, 10_000])
def test_fused_loss_and_every_gradient_equal_the_full_logits_path(monkeypatch, tie, reduction,
                                                                  chunk_rows):
    model = _tiny(tie_word_embeddings=tie)
    ids = _ids(T=40, B=3)
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 25:] = -100
    ref = _full_logits_loss(model, ids, labels, reduction)
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(model_builder, 'LOSS_CHUNK_ELEMENTS', chunk_rows * VOCAB)
    none, loss = model(ids, labels=labels, reduction=reduction)
    assert none is None
    loss.backward()
    grads = _grads(model)
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name
    if tie:  # the head's gradient reaches the shared embedding matrix
        assert 'transformer.wte.weight' in grads and 'lm_head.weight' not in grads


def test_a_tied_table_gets_one_gradient_buffer_in_backward():
    """The head's gradient waits for the lookup's rows (_TiedLookup): autograd's own path would make
    a second vocab x width gradient at the end of backward and add the two (the step's peak)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = _tiny(tie_word_embeddings=True)
    table = model.transformer.wte.weight
    ids = _ids(T=40, B=3)
    _, loss = model(ids, labels=ids)

    class NewTableSized(TorchDispatchMode):
        made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if (isinstance(out, torch.Tensor) and out.shape == table.shape
                    and out.untyped_storage().data_ptr() not in ins):
                self.made.append(str(func))
            return out

    with NewTableSized():
        loss.backward()
    assert NewTableSized.made == []
    ref = _full_logits_loss(model, ids, ids, 'mean')
    grad, table.grad = table.grad, None
    ref.backward()
    assert torch.allclose(grad, table.grad, rtol=1e-4, atol=1e-6)


def test_the_tied_lookup_sums_repeated_ids_the_same_way_on_every_run():
    """Resumes are bit-exact only if the rows of repeated ids add up in a fixed order: CPU
    index_put_(accumulate=True) races between threads (measured: 20 runs differ at 2 threads)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (100, 200), generator=g)
    weight = torch.randn(1000, 64, generator=g).requires_grad_()
    head_grad, grad_out = torch.randn(1000, 64, generator=g), torch.randn(100, 200, 64, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(10):
            table_grad = {'weight': head_grad.clone()}
            model_builder._TiedLookup.apply(ids, weight, table_grad).backward(grad_out)
            grads.append(weight.grad)
            weight.grad = None
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], x) for x in grads)
    want = head_grad.index_add(0, ids.reshape(-1), grad_out.reshape(-1, 64))
    assert torch.allclose(grads[0], want, rtol=1e-5, atol=1e-5)


def test_trained_positions_made_on_the_host_give_the_same_loss_and_gradients():
    model = _tiny()
    ids = _ids(T=30, B=3)
    labels = ids.clone()
    labels[:, :8] = -100
    labels[2, 12:] = -100
    labels[0, -1] = -100
    index = model_builder.trained_positions(labels)
    # position b*T+t is kept when labels[b, t+1] is trained: never the last position of a row
    T = labels.size(1)
    assert index.tolist() == [b * T + t for b in range(3) for t in range(T - 1) if labels[b, t + 1] != -100]
    _, ref = model(ids, labels=labels)
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    _, loss = model(ids, labels=labels, trained_index=index)
    loss.backward()
    assert loss.item() == ref.item()
    assert all(torch.equal(g, ref_grads[n]) for n, g in _grads(model).items())
    _, zero = model(ids, labels=torch.full_like(ids, -100),
                    trained_index=model_builder.trained_positions(torch.full_like(ids, -100)))
    assert zero.item() == 0.0


@pytest.mark.gpu
def test_loss_forward_on_cuda_with_host_made_trained_positions_makes_no_host_sync():
    """With trained_index made on the host (train_sft.forward_backward does), the forward, the
    fused loss and its in-forward gradients never wait for the GPU."""
    model = _tiny().cuda()
    ids = _ids(T=32, B=2)
    labels = ids.clone()
    labels[:, :10] = -100
    index = model_builder.trained_positions(labels)   # on the host
    ids, labels = ids.cuda(), labels.cuda()
    model(ids, labels=labels)[1].backward()           # warm-up: allocator, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        _, loss = model(ids, labels=labels, trained_index=index.to('cuda', non_blocking=True))
    finally:
        torch.cuda.set_sync_debug_mode('default')
    loss.backward()
    assert torch.isfinite(loss)


def test_linear_cross_entropy_equals_linear_then_cross_entropy_in_float64():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(F.linear(h, w), t, reduction='sum')
    gh, gw = torch.autograd.grad(ref * 0.5, (h, w))
    for rows in (1, 5, 37, 100):
        loss = model_builder.linear_cross_entropy(h, w, t, chunk_rows=rows)
        assert loss.dtype == torch.float64
        fh, fw = torch.autograd.grad(loss * 0.5, (h, w))  # the upstream gradient scales both
        assert abs(loss.item() - ref.item()) < 1e-9
        assert torch.allclose(fh, gh, atol=1e-12) and torch.allclose(fw, gw, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_swiglu_equals_autograd_bit_for_bit_and_keeps_only_its_input(dtype):
    def silu_then_mul(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(3, 7, 2 * 48, generator=g).to(dtype)
    grad = torch.randn(3, 7, 48, generator=g).to(dtype)
    results = []
    for fn in (silu_then_mul, model_builder._SwiGLU.apply):
        h = h0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(h)
        y.backward(grad)
        results.append((y, h.grad, saved))
    (y_ref, g_ref, saved_ref), (y, g, saved) = results
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    assert len(saved) == 1 and saved[0] is not None and saved[0].shape == h0.shape
    assert len(saved_ref) == 3   # gate, silu(gate), up


@pytest.mark.parametrize('autocast', [False, True])
@pytest.mark.parametrize('bias', [False, True])
def test_swiglu_with_the_down_projection_equals_autograd_bit_for_bit_and_keeps_only_its_input(autocast, bias):
    """The down projection's input (F per token) is recomputed in backward, not kept: fp32, and bf16
    autocast (the weight cast as autocast casts it, its gradient back in fp32)."""
    def reference(h, w, b):
        gate, up = h.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w, b)

    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(3, 7, 2 * 48, generator=g)
    w0, b0 = torch.randn(16, 48, generator=g) / 7, torch.randn(16, generator=g) if bias else None
    grad = torch.randn(3, 7, 16, generator=g)
    results = []
    for fn in (reference, model_builder._SwiGLU.apply):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            h = h0.to(torch.bfloat16 if autocast else torch.float32).requires_grad_()
            w = w0.clone().requires_grad_()
            b = b0.clone().requires_grad_() if bias else None
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = fn(h, w, b)
        y.backward(grad.to(y.dtype))
        results.append((y, h.grad, w.grad, b.grad if bias else None, saved))
    (y_ref, *grads_ref, saved_ref), (y, *grads, saved) = results
    assert torch.equal(y, y_ref)
    for got, want in zip(grads, grads_ref):
        assert (got is None and want is None) or (got.dtype == want.dtype and torch.equal(got, want))
    kept = [t.numel() for t in saved]
    assert sorted(kept) == sorted([h0.numel(), w0.numel()])   # h and the (cast) weight only
    assert sum(t.numel() for t in saved_ref) > sum(kept) + h0.numel() // 2 - 1


@pytest.mark.parametrize('dtype, autocast', [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_rmsnorm_equals_hf_arithmetic_and_keeps_its_input_not_the_normalized_x(dtype, autocast):
    """Outputs bit-identical to weight * rms_norm(x.float()).to(x.dtype), gradients to 2 ulp; for
    backward only x, one 1/rms per row and the weight are kept (autograd also keeps the normalized x)."""
    g = torch.Generator().manual_seed(0)
    x0, w0 = (torch.randn(3, 5, 64, generator=g) * 3).to(dtype), torch.randn(64, generator=g)
    grad = torch.randn(3, 5, 64, generator=g)
    results = []
    for fn in (lambda x, w: w * F.rms_norm(x.float(), (64,), eps=1e-6).to(x.dtype),
               lambda x, w: model_builder._RMSNorm.apply(x, w, 1e-6)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        saved = []
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(x, w)
        y.backward(grad.to(y.dtype))
        results.append((y, x.grad, w.grad, sum(t.numel() for t in saved)))
    (y_ref, gx_ref, gw_ref, kept_ref), (y, gx, gw, kept) = results
    assert torch.equal(y, y_ref) and gx.dtype == gx_ref.dtype
    assert torch.allclose(gx.float(), gx_ref.float(), rtol=0, atol=4 * torch.finfo(gx.dtype).eps * gx_ref.float().abs().max())
    assert torch.allclose(gw, gw_ref, rtol=1e-6, atol=1e-6)
    assert kept == x0.numel() + 3 * 5 + 64 < kept_ref


def test_return_logits_gives_the_full_logits_next_to_the_fused_loss():
    model = _tiny()
    ids = _ids(T=12, B=2)
    logits, _ = model(ids)
    full, loss = model(ids, labels=ids, return_logits=True)
    assert torch.equal(full, logits)
    assert abs(loss.item() - _full_logits_loss(model, ids, ids, 'mean').item()) < 1e-5


def test_loss_under_no_grad_computes_no_gradients():
    model = _tiny()
    ids = _ids(T=12, B=2)
    with torch.no_grad():
        _, loss = model(ids, labels=ids)
    assert not loss.requires_grad
    assert abs(loss.item() - _full_logits_loss(model, ids, ids, 'mean').item()) < 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_fused_loss_under_bf16_autocast_matches_autocast_linear_then_float_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(29, 32, requires_grad=True)
    w = (torch.randn(60, 32) * 0.2).requires_grad_()
    t = torch.randint(0, 60, (29,))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction='sum')
        loss = model_builder.linear_cross_entropy(h, w, t, chunk_rows=8)
    gh, gw = torch.autograd.grad(ref, (h, w))
    fh, fw = torch.autograd.grad(loss, (h, w))
    assert fh.dtype == h.dtype and fw.dtype == w.dtype  # fp32 master grads, as autograd gives
    assert abs(loss.item() - ref.item()) < 1e-3 * abs(ref.item())
    assert (fh - gh).abs().max() < 2e-2 * gh.abs().max()
    assert (fw - gw).abs().max() < 2e-2 * gw.abs().max()


def test_a_second_backward_through_the_fused_loss_is_refused():
    model = _tiny()
    ids = _ids(T=12, B=2)
    _, loss = model(ids, labels=ids)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='one backward per forward'):
        loss.backward()


@pytest.mark.parametrize('tied', [True, False])
def test_a_batch_without_trained_tokens_gives_every_weight_a_zero_gradient(tied):
    """DDP and FSDP fail (or hang) when a weight gets no gradient on one rank only: an untied LM head
    is not reached through the hidden states when no position is trained."""
    model = _tiny(tie_word_embeddings=tied)
    ids = _ids(T=16, B=2)
    _, loss = model(ids, labels=torch.full_like(ids, -100))
    loss.backward()
    assert loss.item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def test_compiled_model_does_not_recompile_when_the_trained_token_count_changes():
    """The loss runs eager (a lazy torch.compiler.disable): compiling it per trained-token count would
    recompile on every new batch until dynamo's cache limit."""
    import torch._dynamo
    torch._dynamo.reset()
    model = _tiny()
    compiled = torch.compile(model, backend='aot_eager')  # no C compiler needed
    ids = _ids(T=24, B=2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n_masked in (3, 11, 17, 20):
            labels = ids.clone()
            labels[:, :n_masked] = -100
            _, loss = compiled(ids, labels=labels)
            loss.backward()
            assert abs(loss.item() - _full_logits_loss(model, ids, labels, 'mean').item()) < 1e-5
    torch._dynamo.reset()


def test_compiled_model_does_not_recompile_when_the_document_lengths_change():
    """Packed batches differ in document count and lengths. The second batch's recompile is dynamo
    making the count dynamic; after it, new lengths and counts reuse the graphs, not one graph per
    batch until dynamo's cache limit."""
    import torch._dynamo
    torch._dynamo.reset()
    model = _tiny()
    compiled = torch.compile(model, backend='aot_eager')

    def step(seed):
        ids, labels, pos, _, cu = _packed_batch(seed=seed)
        _, loss = compiled(ids, labels=labels, position_ids=pos, cu_seqlens=cu, max_seqlen=9)
        loss.backward()
        _, ref = model(ids, labels=labels, position_ids=pos, cu_seqlens=cu, max_seqlen=9)
        assert abs(loss.item() - ref.item()) < 1e-5
        return cu.numel()

    counts = {step(5), step(6)}
    with torch._dynamo.config.patch(error_on_recompile=True):
        counts |= {step(seed) for seed in (7, 8, 9)}
    assert len(counts) >= 3            # the batches did differ in document count
    torch._dynamo.reset()


@pytest.mark.gpu
def test_fused_loss_on_cuda_under_bf16_autocast_matches_the_full_logits_path():
    model = _tiny().cuda()
    ids = _ids(T=64, B=4).cuda()
    labels = ids.clone()
    labels[:, :20] = -100
    with torch.autocast('cuda', dtype=torch.bfloat16):
        ref = _full_logits_loss(model, ids, labels, 'mean')
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        _, loss = model(ids, labels=labels)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    for name, g in _grads(model).items():
        assert g.dtype == torch.float32
        assert (g - ref_grads[name]).abs().max() <= 5e-2 * ref_grads[name].abs().max(), name


def test_no_trained_token_gives_exact_zero_loss_that_backprops():
    model = _tiny()
    ids = _ids()
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # the first position is never a target after the shift
    _, loss = model(ids, labels=labels)
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_packed_documents_give_the_same_logits_as_each_document_alone():
    for overrides in ({}, {'pos_encoding': 'learned', 'norm_type': 'layernorm', 'mlp_type': 'gelu'}):
        model = _tiny(**overrides).eval()
        a, b = _ids(T=7, B=1, seed=2), _ids(T=5, B=1, seed=3)
        packed = torch.cat([a, b], dim=1)
        doc_ids = torch.tensor([[0] * 7 + [1] * 5])
        pos = torch.tensor([list(range(7)) + list(range(5))])
        with torch.no_grad():
            both, _ = model(packed, position_ids=pos, doc_ids=doc_ids)
            la, _ = model(a)
            lb, _ = model(b)
        assert (both[:, :7] - la).abs().max() < 1e-5
        assert (both[:, 7:] - lb).abs().max() < 1e-5


def _packed_batch(B=2, T=24, seed=5):
    """Rows of documents of 1..9 tokens (the pad tail one of its own), as sft_data packs them."""
    g = torch.Generator().manual_seed(seed)
    ids, doc_ids, pos = _ids(T=T, B=B, seed=seed), torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    starts = []
    for r in range(B):
        t, d = 0, 0
        while t < T:
            n = min(int(torch.randint(1, 10, (1,), generator=g)), T - t)
            doc_ids[r, t:t + n], pos[r, t:t + n] = d, torch.arange(n)
            starts.append(r * T + t)
            t, d = t + n, d + 1
    labels = ids.masked_fill(pos == 0, -100)
    return ids, labels, pos, doc_ids, torch.tensor(starts + [B * T], dtype=torch.int32)


def _loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    _, loss = model(ids, labels=labels, **kw)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize('attention', ['auto', 'per_doc'])
@pytest.mark.parametrize('given', ['doc_ids', 'cu_seqlens', 'both'])
def test_packed_rows_loss_and_every_gradient_equal_the_dense_mask_path(attention, given):
    """GQA (4 query / 2 KV heads) and QK-norm: per-document attention vs today's dense mask, fp32."""
    model = _tiny()
    ids, labels, pos, doc_ids, cu = _packed_batch()
    model.config.attention = 'dense'
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels, position_ids=pos, doc_ids=doc_ids)
    model.config.attention = attention
    kw = {'doc_ids': dict(doc_ids=doc_ids), 'cu_seqlens': dict(cu_seqlens=cu, max_seqlen=9),
          'both': dict(doc_ids=doc_ids, cu_seqlens=cu)}[given]
    loss, grads = _loss_and_grads(model, ids, labels, position_ids=pos, **kw)
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max() < 1e-5, name


def test_dense_path_takes_boundaries_given_as_cu_seqlens_alone():
    model = _tiny()
    ids, labels, pos, doc_ids, cu = _packed_batch()
    model.config.attention = 'dense'
    a, _ = model(ids, labels=labels, position_ids=pos, doc_ids=doc_ids)
    b, _ = model(ids, labels=labels, position_ids=pos, cu_seqlens=cu)
    assert a is None and b is None
    _, la = model(ids, labels=labels, position_ids=pos, doc_ids=doc_ids)
    _, lb = model(ids, labels=labels, position_ids=pos, cu_seqlens=cu)
    assert la.item() == lb.item()


@pytest.mark.parametrize('mode', ['full', 'selective'])
@pytest.mark.parametrize('packed', [False, True])
def test_activation_checkpointing_leaves_loss_and_gradients_unchanged(mode, packed):
    """Dropout on: the recomputed blocks must replay the same dropout masks."""
    model = _tiny(dropout=0.1, n_layer=3)
    ids, labels, pos, doc_ids, cu = _packed_batch()
    kw = dict(position_ids=pos, cu_seqlens=cu) if packed else {}
    torch.manual_seed(1)
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels, **kw)
    model.set_activation_checkpointing(mode, every=2)
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(model, ids, labels, **kw)
    assert abs(loss - ref_loss) < 1e-6
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max() < 1e-6, name


def _saved_activation_bytes(model, ids, labels):
    """Bytes autograd keeps for backward during the forward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(ids, labels=labels)
    loss.backward()
    return sum(seen.values())


def test_activation_checkpointing_keeps_fewer_activations_and_full_keeps_the_fewest():
    model = _tiny(n_layer=4)
    ids = _ids(T=64, B=2)
    kept = {}
    for mode in ('none', 'selective', 'full'):
        model.set_activation_checkpointing(mode, every=2)
        kept[mode] = _saved_activation_bytes(model, ids, ids)
    assert kept['full'] < kept['selective'] < kept['none']
    assert kept['full'] < 0.5 * kept['none']
    with pytest.raises(ValueError, match='must be one of'):
        model.set_activation_checkpointing('some')


def test_compiled_model_with_checkpointed_blocks_and_packed_rows_matches_eager():
    import torch._dynamo
    torch._dynamo.reset()
    model = _tiny()
    model.set_activation_checkpointing('full')
    ids, labels, pos, doc_ids, cu = _packed_batch()
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels, position_ids=pos, cu_seqlens=cu)
    compiled = torch.compile(model, backend='aot_eager')
    model.zero_grad(set_to_none=True)
    _, loss = compiled(ids, labels=labels, position_ids=pos, cu_seqlens=cu, max_seqlen=9)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for name, g in _grads(model).items():
        assert (g - ref_grads[name]).abs().max() < 1e-5, name
    torch._dynamo.reset()


@pytest.mark.gpu
def test_packed_rows_on_cuda_under_bf16_autocast_take_varlen_and_match_the_dense_mask(monkeypatch):
    import torch.nn.attention.varlen as varlen
    calls = []
    real = varlen.varlen_attn
    monkeypatch.setattr(varlen, 'varlen_attn', lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
    model = _tiny(n_head=4, n_kv_head=2, head_dim=64).cuda()
    ids, labels, pos, doc_ids, cu = _packed_batch()
    ids, labels, pos, doc_ids = ids.cuda(), labels.cuda(), pos.cuda(), doc_ids.cuda()
    out = {}
    for attention in ('dense', 'auto'):
        model.config.attention = attention
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out[attention] = _loss_and_grads(model, ids, labels, position_ids=pos, doc_ids=doc_ids,
                                              cu_seqlens=cu, max_seqlen=9)
    assert calls and set(calls) == {torch.bfloat16} and len(calls) == model.config.n_layer
    assert abs(out['auto'][0] - out['dense'][0]) < 2e-2
    for name, g in out['auto'][1].items():
        ref = out['dense'][1][name]
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, name


def test_gqa_qk_norm_bias_and_dropout_knobs_build_and_train():
    model = _tiny(dropout=0.1, bias=True, attn_qkv_bias=True, n_kv_head=1)
    model.train()
    ids = _ids()
    _, loss = model(ids, labels=ids)
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------- generation
def test_greedy_generate_with_cache_equals_without_and_stops_at_stop_id():
    model = _tiny().eval()
    prompt = _ids(T=6, B=1)[0].tolist()
    cached = model.generate([prompt], 12, temperature=0)
    plain = model.generate([prompt], 12, temperature=0, use_cache=False)
    assert cached == plain and len(cached[0]) == 12
    # reference: argmax over full forward passes
    seq = list(prompt)
    for _ in range(12):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert cached[0] == seq[len(prompt):]
    stop = cached[0][4]
    first = cached[0].index(stop)
    streamed = []
    out = model.generate([prompt], 12, temperature=0, stop_ids=[stop],
                         on_token=lambda row, tok: streamed.append((row, tok)))
    assert out[0] == cached[0][:first + 1] and out[0][-1] == stop
    assert streamed == [(0, t) for t in out[0]]


@pytest.mark.parametrize('use_cache', [True, False])
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(use_cache):
    for overrides in ({}, {'pos_encoding': 'learned', 'norm_type': 'layernorm', 'mlp_type': 'gelu'}):
        model = _tiny(**overrides).eval()
        prompts = [_ids(T=t, B=1, seed=t)[0].tolist() for t in (3, 9, 5)]
        batched = model.generate(prompts, 8, temperature=0, use_cache=use_cache)
        single = [model.generate([p], 8, temperature=0)[0] for p in prompts]
        assert batched == single


def test_sampling_respects_top_k_top_p_and_generator():
    model = _tiny().eval()
    prompt = _ids(T=4, B=1)[0].tolist()
    g = lambda: torch.Generator().manual_seed(5)
    a = model.generate([prompt], 6, temperature=1.0, top_k=5, generator=g())
    b = model.generate([prompt], 6, temperature=1.0, top_k=5, generator=g())
    assert a == b
    # top_k=1 and a tiny top_p both reduce sampling to greedy
    greedy = model.generate([prompt], 6, temperature=0)
    assert model.generate([prompt], 6, temperature=0.7, top_k=1, generator=g()) == greedy
    assert model.generate([prompt], 6, temperature=0.7, top_p=1e-6, generator=g()) == greedy


def test_configure_optimizers_decays_only_matrices():
    model = _tiny(bias=True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() < 2 for p in no_decay['params'])
    n = sum(p.numel() for g in opt.param_groups for p in g['params'])
    assert n == sum(p.numel() for p in model.parameters())


def test_param_count_matches_config_formula():
    for preset_overrides in ({}, {'tie_word_embeddings': False, 'bias': True}):
        model = _tiny(**preset_overrides)
        assert sum(p.numel() for p in model.parameters()) == model.config.num_params(non_embedding=False)
    gpt = ConfigurableGPT(ModelArchitectureConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    assert sum(p.numel() for p in gpt.parameters()) == gpt.config.num_params(non_embedding=False)


def test_generate_accepts_a_tensor_of_prompts():
    model = _tiny().eval()
    prompts = _ids(T=5, B=2)
    assert model.generate(prompts, 4, temperature=0) == model.generate(prompts.tolist(), 4, temperature=0)
