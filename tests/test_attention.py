"""attention.py: document-masked attention without a dense mask (per-document SDPA on CPU, flash
varlen on CUDA), against the dense (B, 1, T, T) mask it replaces."""
import pytest
import torch
import torch.nn.functional as F

import attention
from attention import (Documents, cu_seqlens_from_doc_ids, dense_doc_mask, doc_ids_from_cu_seqlens,
                       document_attention, resolve)

LENGTHS = [[5, 1, 9, 3], [7, 11]]   # two rows of 18 tokens: documents of 1 to 11 tokens


def _doc_ids():
    return torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in LENGTHS])


def _qkv(H=4, KV=2, D=8, dtype=torch.float64, device='cpu'):
    g = torch.Generator().manual_seed(0)
    B, T = len(LENGTHS), sum(LENGTHS[0])
    return [torch.randn(B, T, h, D, generator=g, dtype=dtype).to(device).requires_grad_()
            for h in (H, KV, KV)]


def _dense_reference(q, k, v, doc_ids):
    """Today's path: the (B, 1, T, T) mask and K/V repeated for every query head."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_doc_mask(doc_ids))
    return y.transpose(1, 2)


def _flat(x):
    return x.reshape(-1, *x.shape[2:])


def test_cu_seqlens_and_doc_ids_describe_the_same_documents():
    doc_ids = _doc_ids()
    cu = cu_seqlens_from_doc_ids(doc_ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 5, 6, 15, 18, 25, 36]
    # numbering restarts per row there, per stream here: the same partition of the tokens
    back = doc_ids_from_cu_seqlens(cu, *doc_ids.shape)
    same_doc = lambda d: d[:, :, None] == d[:, None, :]
    assert torch.equal(same_doc(back), same_doc(doc_ids))


def test_per_doc_output_and_gradients_equal_the_dense_mask_with_gqa():
    doc_ids = _doc_ids()
    q, k, v = _qkv()
    ref = _dense_reference(q, k, v, doc_ids)
    docs = Documents(cu_seqlens_from_doc_ids(doc_ids), None, 'per_doc')
    out = document_attention(_flat(q), _flat(k), _flat(v), docs).view_as(ref)
    assert (out - ref).abs().max() < 1e-12
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() < 1e-12


def test_per_doc_work_is_the_sum_of_squared_document_lengths_with_no_kv_copies(monkeypatch):
    """The cost claim, structurally: one causal SDPA per document (Lq x Lk = L x L), K/V with their
    own (fewer) heads, and nothing of size T x T anywhere."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw))
        return real(q, k, v, **kw)
    monkeypatch.setattr(attention.F, 'scaled_dot_product_attention', spy)
    q, k, v = _qkv(H=4, KV=2)
    docs = Documents(cu_seqlens_from_doc_ids(_doc_ids()), None, 'auto')
    document_attention(_flat(q), _flat(k), _flat(v), docs)
    lengths = [n for row in LENGTHS for n in row]
    assert [c[0][-2] for c in calls] == lengths
    assert all(c[1][-3] == 2 and c[0][-3] == 4 for c in calls)          # native GQA
    assert all(c[2]['is_causal'] and c[2]['enable_gqa'] for c in calls)
    assert sum(c[0][-2] * c[1][-2] for c in calls) == sum(n * n for n in lengths)


def test_resolve_picks_the_flash_kernel_only_where_it_runs():
    assert resolve('auto', 'cpu', torch.float32)[0] == 'per_doc'
    assert resolve('auto', 'cpu', torch.bfloat16)[0] == 'per_doc'
    assert resolve('auto', 'cuda', torch.float32)[0] == 'per_doc'       # flash needs fp16/bf16
    assert resolve('auto', 'cuda', torch.bfloat16, dropout=0.1)[0] == 'per_doc'
    if attention.varlen_available():
        assert resolve('auto', 'cuda', torch.bfloat16) == ('varlen', 'auto: flash varlen kernel on CUDA')
    assert resolve('dense', 'cuda', torch.bfloat16)[0] == 'dense'
    with pytest.raises(ValueError, match="attention='varlen' needs CUDA"):
        resolve('varlen', 'cpu', torch.float32)
    with pytest.raises(ValueError, match='must be one of'):
        resolve('flash', 'cpu', torch.float32)


def test_the_flash_kernel_is_not_chosen_where_varlen_attn_lacks_window_size_and_gqa(monkeypatch):
    """torch 2.9's varlen_attn (is_causal, no window_size / enable_gqa): the call would fail."""
    import torch.nn.attention.varlen as varlen

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError('not to be called')
    monkeypatch.setattr(varlen, 'varlen_attn', varlen_attn)
    assert not attention.varlen_available()
    assert resolve('auto', 'cuda', torch.bfloat16)[0] == 'per_doc'


def test_documents_read_lengths_once_from_host_boundaries():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    docs = Documents(cu, None, 'auto')
    assert docs.lengths == [3, 7] and docs.max_seqlen() == 7
    assert Documents(cu, 9, 'auto').max_seqlen() == 9       # a caller's host value is taken as is
    assert docs.cu_on('cpu') is docs.cu_on('cpu')


def test_the_documents_a_forward_gets_need_no_filling_in_the_layers():
    """Under torch.compile a checkpointed block that fills a cache of an object made outside it is a
    side effect dynamo does not compile: the block would run eager. The varlen path reads only the
    device boundaries and the caller's max_seqlen, both made before the layers."""
    cu = torch.tensor([0, 3, 10, 16], dtype=torch.int32)
    _, docs = attention.packed_documents('auto', 2, 8, None, cu, 7, 'cpu')
    before = dict(vars(docs))
    assert docs.cu_on('cpu') is before['_device_cu'] and docs.max_seqlen() == 7
    assert vars(docs) == before


@pytest.mark.gpu
def test_varlen_on_cuda_matches_the_dense_mask_in_bf16_without_a_host_sync():
    if not torch.cuda.is_available() or not attention.varlen_available():
        pytest.skip('needs a CUDA GPU and torch.nn.attention.varlen')
    doc_ids = _doc_ids()
    q, k, v = _qkv(H=4, KV=2, D=64, dtype=torch.bfloat16, device='cuda')
    ref = _dense_reference(q.float(), k.float(), v.float(), doc_ids.cuda())
    cu = cu_seqlens_from_doc_ids(doc_ids)              # on the host, as sft_data makes it
    docs = Documents(cu, int(torch.diff(cu).max()), 'auto')
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = document_attention(_flat(q), _flat(k), _flat(v), docs).view_as(ref)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out.float().square().sum().backward()
    assert (out.float() - ref).abs().max() < 2e-2
    g = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip((q.grad, k.grad, v.grad), g):
        assert (a.float() - b.float()).abs().max() / b.float().abs().max() < 3e-2
