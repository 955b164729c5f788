"""LoRA / QLoRA benchmark on CPU: nanoSFT full fine-tuning, LoRA, QLoRA vs TRL SFTTrainer + PEFT LoRA.

Same model for all: the `qwen3-0.6b` preset shape (28 layers, width 1024, 16/8 heads, SwiGLU 3072,
tied embeddings, the real 151,936 vocabulary), random weights (seed 0) saved once in bf16, as Qwen3
checkpoints ship, as a transformers Qwen3ForCausalLM directory (nanoSFT reads a LoRA base as stored,
as train_sft does, full fine-tuning into fp32). Same data: the first GSM8K train
conversations (user = question, assistant = answer; only the answer and its <|im_end|> trained), packed
into rows of 512 tokens, one row per optimizer step, the same number of steps. Same adapter: rank 16,
alpha 32, no dropout, on q/k/v/o/gate/up/down (every attention and MLP projection), AdamW. Two
precisions, each tool against the other at the same one: fp32 math (the model loaded into fp32), and
the `_amp` pair, bf16 autocast on the CPU (fast where it has AVX512-BF16 or AMX) with the frozen base
held in bf16 as it ships and the trained adapters, gradients and AdamW state in fp32.

    python benchmarks/bench_lora.py --json lora.json            # 3 interleaved repeats, medians
    python benchmarks/bench_lora.py --repeats 1 --steps 1 --contenders nanosft_lora,trl_lora

Contenders (each in its own process, run in turn, repeated --repeats times interleaved)
  nanosft_full    hf_interop.from_hf, every parameter trained (configure_optimizers' AdamW).
  nanosft_lora    + lora.apply_lora(LoRAConfig(rank=16, alpha=32)): base frozen in fp32.
  nanosft_lora_bf16  the same with lora_base_dtype='bfloat16': the frozen projections held as they
                  ship (bf16), cast up at each use; the same fp32 math on the same values (lossless).
  nanosft_qlora   + quantize=True: the projections' frozen weights in torchao NF4; embedding fp32.
  nanosft_qlora_emb  + quantize_embeddings=True: the tied embedding / LM head table in NF4 too.
  trl_lora        trl.SFTTrainer(peft_config=peft.LoraConfig(same r, alpha, targets)) on the same
                  conversations, at its best documented CPU setting: packing=True (best-fit
                  decreasing, padding-free rows of max_length 512; transformers' SDPA path keeps
                  the packed documents apart from position_ids, checked in tests), assistant_only_loss,
                  sequential sampler, gradient checkpointing off (the same compute as the others),
                  fp32 (bf16=False: the same precision as the others).
  nanosft_lora_amp  train_sft with dtype='bfloat16' on the CPU: bf16 autocast, lora_base_dtype 'auto'
                  (the frozen projections, embedding and LM head held in bf16; fp32 residual stream).
  trl_lora_amp    TRL + PEFT's documented bf16 LoRA setting: the model loaded in bf16
                  (from_pretrained dtype=bfloat16), SFTConfig(bf16=True) (autocast on the CPU), PEFT
                  keeping the adapters in fp32 (autocast_adapter_dtype), otherwise as trl_lora.
  nanosft_lora_ac / trl_lora_gc   the same LoRA runs at each tool's lowest-memory documented setting:
                  nanoSFT activation_checkpointing='full' (every block recomputed), TRL
                  gradient_checkpointing=True (transformers' per-layer checkpointing). Not in the
                  speed comparison (recomputation costs ~1/3 more compute in both); in the memory one.
Each step is timed between its start and end (TRL: a TrainerCallback); the first --warmup steps are
not counted. Memory: the process's peak RSS (VmHWM) over the whole run, and over training alone (the
kernel's peak counter reset through /proc/self/clear_refs after loading and after giving freed heap
back with malloc_trim, for every contender alike).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

CONTENDERS = ('nanosft_full', 'nanosft_lora', 'nanosft_lora_bf16', 'nanosft_qlora', 'nanosft_qlora_emb', 'trl_lora',
              'nanosft_lora_ac', 'trl_lora_gc', 'nanosft_lora_amp', 'trl_lora_amp')
LORAS = ('nanosft_lora', 'nanosft_lora_bf16')   # nanoSFT LoRA without checkpointing: base fp32 / bf16
# nanoSFT LoRA against TRL + PEFT at the same precision: fp32 (two ways to hold the base), bf16 autocast
PAIRS = (('nanosft_lora', 'trl_lora'), ('nanosft_lora_bf16', 'trl_lora'), ('nanosft_lora_amp', 'trl_lora_amp'))
PROJECTIONS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
LR, BETAS, WD, GRAD_CLIP = 1e-4, (0.9, 0.95), 0.0, 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--contenders', default=','.join(CONTENDERS), help=f'comma list from {CONTENDERS}')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--steps', type=int, default=3, help='timed steps after warmup')
    p.add_argument('--block_size', type=int, default=512)
    p.add_argument('--rank', type=int, default=16)
    p.add_argument('--alpha', type=float, default=32.0)
    p.add_argument('--preset', default='qwen3-0.6b')
    p.add_argument('--n_layer', type=int, default=None, help='override the preset (smoke tests)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--jobs', type=int, default=1,
                   help='contenders run at once: 1 for measurements; more only to smoke-test the script')
    p.add_argument('--data', default=common.GSM8K)
    p.add_argument('--json', default=None)
    p.add_argument('--workdir', default=None)
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--model_dir', default=None, help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Memory readings

def vm_hwm_bytes() -> int:
    """The process's peak RSS as the kernel counts it (resettable, unlike ru_maxrss)."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    return common.peak_rss_bytes()


def start_training_peak() -> dict:
    """Hand freed heap back (glibc keeps it otherwise) and reset the peak RSS counter: what follows
    measures training alone. Returns the readings of the loading phase."""
    before = {'load_peak_rss_bytes': vm_hwm_bytes()}
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:
        pass
    before['rss_at_train_start_bytes'] = common.rss_bytes()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')   # resets VmHWM to the current RSS (Linux >= 4.0)
    return before


def _model_arch(args):
    common.ensure_repo_on_path()
    from model_config import ModelArchitectureConfig
    over = {'block_size': args.block_size}
    if args.n_layer:
        over['n_layer'] = args.n_layer
    return ModelArchitectureConfig.from_preset(args.preset, **over)


def _conversations(args):
    # 2.5 GSM8K conversations fill a 512-token row on average: 4 per row leaves room for the packer
    return common.gsm8k_conversations(args.data, 4 * (args.warmup + args.steps) + 8)


def trl_rows(args, seqs, n_steps):
    """The conversations in each of the first n_steps rows TRL's trainer makes of these conversations
    (trl.pack_dataset, best-fit decreasing, in its row order): the nanoSFT contenders train exactly
    those, so every contender sees the same examples per step (checked: same trained tokens per step).
    Without TRL: train_sft's own best-fit rows."""
    lengths = [min(len(ids), args.block_size) for ids, _ in seqs]
    try:
        from datasets import Dataset
        from trl import pack_dataset
    except ImportError:
        from sft_data import pack_best_fit
        return pack_best_fit(range(len(seqs)), lengths, args.block_size)[:n_steps]
    packed = pack_dataset(Dataset.from_dict({'input_ids': [[i] * n for i, n in enumerate(lengths)]}),
                          args.block_size, strategy='bfd')
    return [list(dict.fromkeys(row)) for row in packed['input_ids'][:n_steps]]


# ----------------------------------------------------------------------------------------------
# Child side: one contender, one process

def child_nanosft(args, name):
    common.ensure_repo_on_path()
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import lora
    from hf_interop import from_hf
    from sft_data import SFTDataset
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    from train_sft import forward_backward
    tok = load_tokenizer('qwen3')
    seqs = [encode_conversation(c, tok) for c in _conversations(args)]
    ds = SFTDataset(seqs, args.block_size, packing=True, pad_id=tok.pad_id, shuffle=False)
    n_steps = args.warmup + args.steps
    units = trl_rows(args, seqs, n_steps)
    if len(units) < n_steps:
        raise SystemExit(f'{name}: only {len(units)} packed rows for {n_steps} steps')
    t0 = time.process_time()
    # as train_sft reads them: a LoRA base as stored (bf16; apply_lora sets the dtypes), else fp32
    model = from_hf(args.model_dir, dtype=None if name != 'nanosft_full' else torch.float32)
    want = _model_arch(args)
    shape = ('n_layer', 'n_embd', 'n_head', 'kv_heads', 'head_size', 'ffn_size', 'vocab_size', 'tie_word_embeddings')
    diff = {k: (getattr(model.config, k), getattr(want, k)) for k in shape
            if getattr(model.config, k) != getattr(want, k)}
    if diff:   # the shared model directory must have the preset's shape
        raise SystemExit(f'{name}: the model differs from the {args.preset} preset: {diff}')
    # what the same base holds in bf16 (tied: counted once), split as the QLoRA report needs it
    numel = {n: p.numel() for n, p in model.named_parameters()}
    proj = [f'{path}.weight' for path in lora.projection_layout(model)]
    extra = {'bf16_base_bytes': 2 * sum(numel.values()), 'bf16_projection_bytes': 2 * sum(numel[k] for k in proj)}
    if name != 'nanosft_full':
        cfg = lora.LoRAConfig(rank=args.rank, alpha=args.alpha, targets=tuple(PROJECTIONS),
                              quantize=name.startswith('nanosft_qlora'), quantize_embeddings=name == 'nanosft_qlora_emb',
                              base_dtype='bfloat16' if name in ('nanosft_lora_bf16', 'nanosft_lora_amp') else 'float32')
        lora.apply_lora(model, cfg)
        if name.endswith('_amp'):   # as train_sft holds the base under bf16 autocast
            lora.hold_embeddings_in(model, torch.bfloat16)
        if name.endswith('_ac'):
            model.set_activation_checkpointing('full')
        held = lora.frozen_bytes(model)
        extra['frozen_base'] = {'projections': sum(held[k] for k in proj),
                                'other': sum(v for k, v in held.items() if k not in proj),
                                'other_numel': sum(numel[k] for k in held if k not in proj)}
    extra['trainable_params'] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra['load_cpu_s'] = time.process_time() - t0
    model.train()
    opt = model.configure_optimizers(WD, LR, BETAS, 'cpu')
    extra.update(start_training_peak())
    times, cpu, trained, total, losses, per_step = [], [], 0, 0, [], []
    device = torch.device('cpu')
    autocast = torch.autocast('cpu', dtype=torch.bfloat16) if name.endswith('_amp') else contextlib.nullcontext()
    for step in range(n_steps):
        batch = ds.collate([units[step]])
        t, c = time.perf_counter(), time.process_time()
        stats = forward_backward(model, [batch], device, autocast=autocast)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        losses.append(float(stats[0] / stats[1].clamp(min=1)))
        per_step.append(int(stats[1]))
        if step >= args.warmup:
            times.append(dt)
            cpu.append(dc)
            trained += int(stats[1])
            total += batch['input_ids'].numel()
    return dict(extra, times=times, cpu_times=cpu, trained_tokens=trained, total_tokens=total,
                losses=losses, trained_per_step=per_step, train_peak_rss_bytes=vm_hwm_bytes())


def child_trl(args, name):
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer
    tok = common.hf_qwen_tokenizer()
    n_steps = args.warmup + args.steps
    ds = Dataset.from_dict({'messages': _conversations(args)})
    t0 = time.process_time()
    amp = name.endswith('_amp')
    model = Qwen3ForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if amp else torch.float32,
                                             attn_implementation='sdpa')
    out_dir = tempfile.mkdtemp(prefix='bench_trl_lora_')
    cfg = SFTConfig(
        output_dir=out_dir, max_steps=n_steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=1, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        weight_decay=WD, max_grad_norm=GRAD_CLIP, lr_scheduler_type='constant', warmup_steps=0,
        max_length=args.block_size, packing=True, assistant_only_loss=True,
        gradient_checkpointing=name.endswith('_gc'), bf16=amp, fp16=False, use_cpu=True, report_to='none',
        save_strategy='no', eval_strategy='no', logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, train_sampling_strategy='sequential', dataset_num_proc=None)
    peft_config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                             target_modules=PROJECTIONS, task_type='CAUSAL_LM')

    class Counting(SFTTrainer):
        batches = []

        def compute_loss(self, model, inputs, *a, **kw):
            lab = inputs['labels']
            self.batches.append((inputs['input_ids'].numel(), int((lab[:, 1:] != -100).sum())))
            return super().compute_loss(model, inputs, *a, **kw)

    timer = common.trl_step_timer(start_training_peak)
    trainer = Counting(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                       peft_config=peft_config, callbacks=[timer])
    load_cpu = time.process_time() - t0
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    w = args.warmup
    losses = [h['loss'] for h in trainer.state.log_history if 'loss' in h]
    return dict(timer.load, times=timer.times[w:], cpu_times=timer.cpu[w:],
                trained_tokens=sum(b[1] for b in Counting.batches[w:n_steps]),
                total_tokens=sum(b[0] for b in Counting.batches[w:n_steps]),
                losses=losses, trainable_params=trainable, load_cpu_s=load_cpu,
                trained_per_step=[b[1] for b in Counting.batches[:n_steps]],
                train_peak_rss_bytes=vm_hwm_bytes())


def run_child(args):
    res = (child_trl if args.child.startswith('trl') else child_nanosft)(args, args.child)
    res.update(contender=args.child, peak_rss_bytes=max(res.get('load_peak_rss_bytes', 0),
                                                        res['train_peak_rss_bytes']))
    res['trained_tok_per_cpu_s'] = res['trained_tokens'] / sum(res['cpu_times'])
    res['trained_tok_per_s'] = res['trained_tokens'] / sum(res['times'])
    with open(args.out + '.tmp', 'w') as f:
        json.dump(res, f)
    os.replace(args.out + '.tmp', args.out)


# ----------------------------------------------------------------------------------------------
# Parent side

def write_model(args, path):
    arch = _model_arch(args)
    common.write_random_qwen3(path, arch.n_layer, arch.n_embd, arch.n_head, arch.kv_heads,
                              arch.ffn_size, arch.vocab_size, head_dim=arch.head_size, dtype='bfloat16')


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    med = {}
    for name, rs in runs.items():
        ok = [r for r in rs if 'error' not in r]
        if not ok:
            med[name] = {'error': rs[-1].get('error', 'no run')}
            continue
        m = {k: statistics.median(r[k] for r in ok) for k in (
            'trained_tok_per_cpu_s', 'trained_tok_per_s', 'peak_rss_bytes', 'train_peak_rss_bytes',
            'load_peak_rss_bytes', 'load_cpu_s')}
        m['cpu_s_per_step'] = statistics.median(sum(r['cpu_times']) / len(r['cpu_times']) for r in ok)
        m['s_per_step'] = statistics.median(sum(r['times']) / len(r['times']) for r in ok)
        m['repeats'] = len(ok)
        m['trained_tokens_per_step'] = ok[0]['trained_tokens'] / len(ok[0]['cpu_times'])
        m['first_loss'] = ok[0]['losses'][0] if ok[0]['losses'] else None
        for k in ('trainable_params', 'frozen_base', 'bf16_base_bytes', 'bf16_projection_bytes', 'trained_per_step'):
            if k in ok[0]:
                m[k] = ok[0][k]
        med[name] = m
    return med


def table(med: dict[str, dict]) -> list[str]:
    mib = lambda b: f'{b / 2 ** 20:,.0f} MiB'  # noqa: E731
    lines = ['| contender | trained tok / CPU-s | CPU s / step | wall s / step | peak RSS (training) '
             '| peak RSS (whole run) | trainable params |', '|---|---:|---:|---:|---:|---:|---:|']
    for name, m in med.items():
        if 'error' in m:
            lines.append(f'| {name} | FAILED: {m["error"][-150:]} | | | | | |')
            continue
        lines.append(f"| {name} | {m['trained_tok_per_cpu_s']:.1f} | {m['cpu_s_per_step']:.1f} | "
                     f"{m['s_per_step']:.1f} | {mib(m['train_peak_rss_bytes'])} | {mib(m['peak_rss_bytes'])} | "
                     f"{m.get('trainable_params', 0) / 1e6:,.2f}M |")
    return lines


def goals(med: dict[str, dict]) -> list[str]:
    out = []
    ok = lambda n: n in med and 'error' not in med[n]  # noqa: E731
    per_step = {n: tuple(m['trained_per_step']) for n, m in med.items() if ok(n) and 'trained_per_step' in m}
    same = len(set(per_step.values())) == 1
    out.append(f"same examples per step for every contender: {'yes' if same else 'NO'} "
               f"(trained tokens per step {next(iter(per_step.values())) if same else per_step})")
    first = {n: med[n]['first_loss'] for n in ('nanosft_full', *LORAS, 'trl_lora', 'nanosft_lora_amp', 'trl_lora_amp')
             if ok(n)}
    out.append(f"first losses (the same base and row: equal but for rounding): "
               f"{', '.join(f'{n} {v:.6f}' for n, v in first.items())}")
    for lo in LORAS:
        if ok(lo) and ok('nanosft_full'):
            for key, what in (('train_peak_rss_bytes', 'training'), ('peak_rss_bytes', 'whole run')):
                r = med[lo][key] / med['nanosft_full'][key]
                out.append(f'{lo} peak RSS ({what}) / full fine-tuning: {r:.2f}x (goal <= 0.4x: '
                           f'{"met" if r <= 0.4 else "not met"})')
    if ok('nanosft_qlora') and 'frozen_base' in med['nanosft_qlora']:
        fb, m = med['nanosft_qlora']['frozen_base'], med['nanosft_qlora']
        bf16 = m['bf16_base_bytes']
        proj = fb['projections'] / m['bf16_projection_bytes']
        held = (fb['projections'] + fb['other']) / bf16
        as_bf16 = (fb['projections'] + 2 * fb['other_numel']) / bf16
        out.append(f"QLoRA NF4 projections: {fb['projections'] / 2**20:,.0f} MiB = {proj:.3f}x their bf16 bytes "
                   f"(goal <= 0.3x: {'met' if proj <= 0.3 else 'not met'})")
        out.append(f"QLoRA whole frozen base with the embedding unquantized: {as_bf16:.3f}x the bf16 base "
                   f"({bf16 / 2**20:,.0f} MiB) when the rest is bf16 (a GPU run); {held:.3f}x as this fp32 "
                   f"CPU run holds it ({(fb['projections'] + fb['other']) / 2**20:,.0f} MiB); goal <= 0.3x: "
                   f"{'met' if as_bf16 <= 0.3 else 'not met'}")
    if ok('nanosft_qlora_emb') and 'frozen_base' in med['nanosft_qlora_emb']:
        fb, m = med['nanosft_qlora_emb']['frozen_base'], med['nanosft_qlora_emb']
        held = (fb['projections'] + fb['other']) / m['bf16_base_bytes']
        out.append(f"QLoRA with quantize_embeddings (the table in NF4 too): whole frozen base "
                   f"{(fb['projections'] + fb['other']) / 2**20:,.0f} MiB = {held:.3f}x the bf16 base (goal <= 0.3x: "
                   f"{'met' if held <= 0.3 else 'not met'})")
    for lo, peer in PAIRS:
        if not (ok(lo) and ok(peer)):
            continue
        a, b = med[lo], med[peer]
        s = a['trained_tok_per_cpu_s'] / b['trained_tok_per_cpu_s']
        out.append(f'{lo} / {peer} trained tokens per CPU-second: {s:.2f}x (goal >= 1.5x: '
                   f'{"met" if s >= 1.5 else "not met"})')
        for key, what in (('train_peak_rss_bytes', 'training'), ('peak_rss_bytes', 'whole run')):
            r = a[key] / b[key]
            out.append(f'{lo} / {peer} peak RSS ({what}): {r:.3f}x (goal <= 0.7x: '
                       f'{"met" if r <= 0.7 else "not met"})')
    if ok('nanosft_lora_ac') and ok('nanosft_full'):
        r = med['nanosft_lora_ac']['train_peak_rss_bytes'] / med['nanosft_full']['train_peak_rss_bytes']
        out.append(f'LoRA + activation checkpointing peak RSS (training) / full fine-tuning without: {r:.2f}x '
                   f'(goal <= 0.4x, at unequal settings: {"met" if r <= 0.4 else "not met"})')
    if ok('nanosft_lora_ac') and ok('trl_lora_gc'):
        a, b = med['nanosft_lora_ac'], med['trl_lora_gc']
        r = a['train_peak_rss_bytes'] / b['train_peak_rss_bytes']
        s = a['trained_tok_per_cpu_s'] / b['trained_tok_per_cpu_s']
        out.append(f'both checkpointed: nanoSFT LoRA / TRL+PEFT peak RSS (training) {r:.2f}x (goal <= 0.7x: '
                   f'{"met" if r <= 0.7 else "not met"}), trained tokens per CPU-second {s:.2f}x')
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    names = [c for c in args.contenders.split(',') if c]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f'--contenders: unknown {unknown}; choose from {CONTENDERS}')
    if not os.path.exists(args.data):
        raise SystemExit(f'--data: {args.data} not found (GSM8K train.jsonl)')
    t_start = time.time()
    work = tempfile.mkdtemp(prefix='bench_lora_', dir=args.workdir)
    model_dir = os.path.join(work, 'model')
    write_model(args, model_dir)
    fwd, skip = [], False   # the children get the same options, minus --json
    for a in (argv if argv is not None else sys.argv[1:]):
        if skip or a.startswith('--json='):
            skip = False
        elif a == '--json':
            skip = True
        else:
            fwd.append(a)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
               HF_DATASETS_OFFLINE='1')
    runs: dict[str, list[dict]] = {n: [] for n in names}
    loads = []
    # interleaved: each repeat runs every contender once, in turn (--jobs at a time: smoke tests only)
    turns = [(rep, name) for rep in range(args.repeats) for name in names]
    for i in range(0, len(turns), args.jobs):
        t0, procs = time.time(), []
        for rep, name in turns[i:i + args.jobs]:
            out = os.path.join(work, f'{name}.{rep}.json')
            cmd = [sys.executable, os.path.abspath(__file__), *fwd, '--child', name,
                   '--model_dir', model_dir, '--out', out]
            procs.append((rep, name, out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE, text=True)))
        for rep, name, out, proc in procs:
            stdout, stderr = proc.communicate()
            loads.append(os.getloadavg()[0])
            if proc.returncode != 0 or not os.path.exists(out):
                runs[name].append({'error': (stderr or stdout).strip()[-3000:]})
                print(f'{name} #{rep}: FAILED\n{stderr[-3000:]}', file=sys.stderr)
                continue
            with open(out) as f:
                runs[name].append(json.load(f))
            r = runs[name][-1]
            print(f'{name} #{rep}: {r["trained_tok_per_cpu_s"]:.1f} trained tok/CPU-s, training peak '
                  f'{r["train_peak_rss_bytes"] / 2**20:,.0f} MiB, {time.time() - t0:.0f} s', file=sys.stderr)
    med = summarize(runs)
    arch = _model_arch(args)
    head = (f"model: {args.preset} shape ({arch.n_layer} layers, width {arch.n_embd}, heads {arch.n_head}/"
            f"{arch.kv_heads} x {arch.head_size}, SwiGLU {arch.ffn_size}, vocab {arch.vocab_size}, "
            f"{arch.num_params(non_embedding=False) / 1e6:.0f}M parameters), "
            f"random weights stored bf16, trained in fp32 (the _amp pair: bf16 autocast); GSM8K packed rows of {args.block_size}, 1 row/step, {args.warmup} warm-up + "
            f"{args.steps} timed steps; LoRA rank {args.rank}, alpha {args.alpha:g}, {len(PROJECTIONS)} projections; "
            f"{args.threads} threads; {args.repeats} interleaved repeats (medians); {common.machine_description()}; "
            f"load average during the run {min(loads):.2f}-{max(loads):.2f}")
    lines = table(med)
    print('\n' + head + '\n' + '\n'.join(lines) + '\n' + '\n'.join(goals(med)))
    print(f'total wall time {time.time() - t_start:.0f} s')
    if args.json:
        blob = {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'machine': common.machine_description(),
                'commit': common.git_commit(), 'head': head, 'args': {k: v for k, v in vars(args).items()
                                                                     if k not in ('child', 'model_dir', 'out')},
                'medians': med, 'runs': runs, 'table': lines, 'goals': goals(med), 'load_average': loads}
        with open(args.json + '.tmp', 'w') as f:
            json.dump(blob, f, indent=1)
        os.replace(args.json + '.tmp', args.json)
    return 0 if all('error' not in m for m in med.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
