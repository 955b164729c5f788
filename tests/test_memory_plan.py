"""memory_plan.py against measured memory of real CPU training steps, and the --plan command."""
import numpy as np
import pytest
import torch

import memory_plan
import model_builder
import train_sft
from memory_plan import Setup, lora_params, plan
from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig
from sft_data import SFTDataset
from test_sft_data import ListSplit


def _arch(n_layer, n_embd, vocab, block, n_head=4, n_kv_head=2):
    return ModelArchitectureConfig.from_preset('tiny', n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                               n_kv_head=n_kv_head, head_dim=n_embd // n_head,
                                               intermediate_size=3 * n_embd, vocab_size=vocab, block_size=block)


def _measured_peak(arch, rows, ac, every=2, finetune='full', base_dtype='float32', dtype='float32',
                   emb_nf4=False):
    """Peak bytes of live tensors in the third step of train_sft's loop (MemTracker follows every
    storage the step creates and frees, plus parameters, gradients and AdamW state); dtype
    'bfloat16': under CPU autocast, the model held as train_sft holds it there."""
    from contextlib import nullcontext
    from torch.distributed._tools.mem_tracker import MemTracker
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(3 * rows * arch.block_size // 15 + 8):
        n = int(rng.integers(5, 40))
        ids = rng.integers(0, arch.vocab_size, n)
        examples.append((ids, np.where(np.arange(n) > n // 3, ids, -100)))
    ds = SFTDataset(ListSplit(examples), arch.block_size, packing=True, pad_id=0, shuffle=False)
    units = ds.units(0)
    torch.manual_seed(0)
    model = ConfigurableGPT(arch).train()
    if finetune != 'full':
        import lora
        lora.apply_lora(model, lora.LoRAConfig(rank=8, quantize=finetune == 'qlora', base_dtype=base_dtype,
                                               quantize_embeddings=emb_nf4))
        if dtype == 'bfloat16' and base_dtype == 'bfloat16':
            lora.hold_embeddings_in(model, torch.bfloat16)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
    model.set_activation_checkpointing(ac, every)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')

    def step(s):
        stats = train_sft.forward_backward(model, [ds.collate(units[s * rows:(s + 1) * rows])], 'cpu',
                                           autocast=autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(stats[1])
    step(0)
    step(1)
    tracker = MemTracker()
    with _frozen_parameters_tracked():
        tracker.track_external(model, opt)
        with tracker:
            trained = step(2)
    return max(d['Total'] for d in tracker.get_tracker_snapshot('peak').values()), trained


class _NoHook:
    def remove(self):
        pass


def _frozen_parameters_tracked():
    """MemTracker registers gradient hooks on every parameter, which a frozen (LoRA base) one refuses:
    for those it gets a hook that is never called, and their bytes are still counted."""
    from unittest import mock
    hook, post = torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook
    return mock.patch.multiple(
        torch.Tensor,
        register_hook=lambda t, fn: hook(t, fn) if t.requires_grad else _NoHook(),
        register_post_accumulate_grad_hook=lambda t, fn: post(t, fn) if t.requires_grad else _NoHook())


@pytest.mark.parametrize('shape', [
    dict(n_layer=2, n_embd=64, vocab=8192, block=256, rows=1, ac='none'),     # LM head / loss bound
    dict(n_layer=3, n_embd=128, vocab=2048, block=512, rows=2, ac='none'),    # activation bound
    dict(n_layer=4, n_embd=128, vocab=2048, block=512, rows=2, ac='full'),
    dict(n_layer=5, n_embd=128, vocab=2048, block=1024, rows=1, ac='selective'),
    # LoRA / QLoRA: one where activations dominate, one where the frozen weights do
    dict(n_layer=3, n_embd=128, vocab=2048, block=512, rows=2, ac='none', finetune='lora'),
    dict(n_layer=4, n_embd=256, vocab=4096, block=64, rows=1, ac='none', finetune='lora'),
    dict(n_layer=4, n_embd=256, vocab=4096, block=64, rows=1, ac='none', finetune='lora', base='bfloat16'),
    dict(n_layer=4, n_embd=128, vocab=2048, block=512, rows=2, ac='full', finetune='qlora'),
    dict(n_layer=4, n_embd=256, vocab=4096, block=64, rows=1, ac='none', finetune='qlora'),
    dict(n_layer=4, n_embd=256, vocab=8192, block=256, rows=1, ac='none', finetune='qlora', emb_nf4=True),
    # CPU bf16 autocast: 16-bit activations; LoRA with the frozen base (embedding too) in bf16
    dict(n_layer=3, n_embd=128, vocab=2048, block=512, rows=2, ac='none', dtype='bfloat16'),
    dict(n_layer=3, n_embd=128, vocab=2048, block=512, rows=2, ac='none', finetune='lora', base='bfloat16',
         dtype='bfloat16'),
    dict(n_layer=4, n_embd=256, vocab=4096, block=64, rows=1, ac='none', finetune='lora', base='bfloat16',
         dtype='bfloat16'),
])
def test_planned_peak_is_within_15_percent_of_the_measured_cpu_step(shape):
    if shape.get('finetune') == 'qlora':
        pytest.importorskip('torchao')
    arch = _arch(shape['n_layer'], shape['n_embd'], shape['vocab'], shape['block'])
    finetune = shape.get('finetune', 'full')
    base = shape.get('base', 'float32')
    dtype = shape.get('dtype', 'float32')
    emb_nf4 = shape.get('emb_nf4', False)
    measured, trained = _measured_peak(arch, shape['rows'], shape['ac'], finetune=finetune, base_dtype=base,
                                       dtype=dtype, emb_nf4=emb_nf4)
    planned = plan(arch, Setup(ac=shape['ac'], finetune=finetune, lora_rank=8, lora_base_dtype=base,
                               quantize_embeddings=emb_nf4),
                   tokens=shape['rows'] * shape['block'], trained_tokens=trained, dtype=dtype, device='cpu').peak
    assert abs(planned / measured - 1) < 0.15, (planned, measured)


def test_activation_checkpointing_and_fsdp_shrink_what_they_should():
    a = ModelArchitectureConfig.from_preset('qwen3-1.7b')
    p = {ac: plan(a, Setup(ac=ac), tokens=8192) for ac in ('none', 'selective', 'full')}
    assert p['full'].activations < p['selective'].activations < p['none'].activations
    assert p['full'].weights == p['none'].weights and p['full'].optimizer == p['none'].optimizer
    ddp, fsdp = (plan(a, Setup(par, 8), tokens=8192) for par in ('ddp', 'fsdp'))
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8)
    assert fsdp.gradients < ddp.gradients / 8      # no DDP bucket copy, sharded 1/8
    assert fsdp.activations == ddp.activations     # sharding does not touch activations
    assert fsdp.peak < ddp.peak
    # the fused loss makes the (vocab x width) fp32 head gradient from the gathered weight: full size
    in_forward = fsdp.phases['forward end (loss)'] - fsdp.weights - fsdp.optimizer - fsdp.activations - fsdp.loss
    assert in_forward == pytest.approx(4 * a.vocab_size * a.n_embd)


def test_lora_rows_count_rank_times_in_plus_out_per_targeted_projection():
    a = ModelArchitectureConfig.from_preset('qwen3-0.6b')     # C 1024, q 2048, kv 1024, ffn 3072
    per_layer = 8 * ((1024 + 2048) + 2 * (1024 + 1024) + (2048 + 1024) + 2 * (1024 + 3072) + (3072 + 1024))
    assert lora_params(a, 8) == 28 * per_layer
    assert lora_params(a, 8, ('q_proj', 'v_proj')) == 28 * 8 * ((1024 + 2048) + (1024 + 1024))
    full, lora, qlora = (plan(a, Setup(finetune=f), tokens=4096) for f in ('full', 'lora', 'qlora'))
    assert lora.optimizer == 8 * lora_params(a, 16) and qlora.weights < lora.weights
    assert qlora.peak < lora.peak < full.peak
    # the frozen base is held in fp32, as train_sft holds it: under bf16 autocast on a GPU that is
    # 4 bytes per weight + the 2-byte copies of the projections that backward keeps
    base = plan(a, Setup(finetune='lora'), tokens=4096, dtype='float32', device='cpu')
    assert base.weights == 4 * a.num_params(non_embedding=False) + 4 * lora_params(a, 16)
    # lora_base_dtype: bf16 projections; 'auto' chooses them under bf16 autocast, where they are
    # also the copies backward keeps (none of its own), and holds the frozen tied embedding in bf16
    proj = 28 * sum(i * o for i, o in memory_plan.block_linears(a).values())
    half = plan(a, Setup(finetune='lora', lora_base_dtype='bfloat16'), tokens=4096, dtype='float32', device='cpu')
    assert half.weights == base.weights - 2 * proj
    gpu = {b: plan(a, Setup(finetune='lora', lora_base_dtype=b), tokens=4096) for b in ('float32', 'auto')}
    assert gpu['float32'].weights - gpu['auto'].weights == 4 * proj + 2 * 151936 * 1024   # 4 + 2 bytes -> 2
    assert plan(a, Setup(finetune='lora'), tokens=4096, device='cpu').weights == gpu['auto'].weights


def test_the_loss_chunk_the_plan_counts_is_the_models():
    assert memory_plan.LOSS_CHUNK_ELEMENTS == model_builder.LOSS_CHUNK_ELEMENTS
    assert memory_plan.HEAD_BLOCK_ROWS == model_builder.HEAD_BLOCK_ROWS


def test_plan_command_prints_every_alternative_and_what_fits(capsys):
    train_sft.main(['--init_from=scratch', '--model_preset=qwen3-1.7b', '--block_size=16384', '--batch_size=1',
                    '--packing=True', '--activation_checkpointing=full', '--plan', '--gpus', '1',
                    '--gpu_memory_gb=40'])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(('* single', '  single'))]
    assert len(rows) == 9 and rows[0].startswith('* single, full, AC full')
    assert rows[0].endswith('yes')                            # 16k tokens of 1.7B fit 40 GB with full AC
    assert any(r.startswith('  single, full, AC none') and r.endswith('no') for r in rows)
    with pytest.raises(SystemExit, match='go with --plan'):
        train_sft.main(['--gpus=8'])
    with pytest.raises(SystemExit, match='--gpus=x: expected a number'):
        train_sft.main(['--plan', '--gpus=x'])
    with pytest.raises(SystemExit, match='--gpu_memory_gb=nan: must be a number > 0'):
        train_sft.main(['--plan', '--gpu_memory_gb=nan'])
