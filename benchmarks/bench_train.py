"""Training-step benchmark: nanoSFT vs a plain transformers loop vs TRL SFTTrainer.

Same random Qwen3-shaped model (real 151,936 vocab, a few small layers), same GSM8K conversations
in the same order, same optimizer step count, same number of conversations per step, fp32. Each
contender runs in a fresh subprocess so its peak memory is its own.

    python benchmarks/bench_train.py                      # CPU (GPU when available)
    python benchmarks/bench_train.py --ablations --json out.json
    python benchmarks/bench_train.py --contenders nanosft --full_logits

Contenders
  nanosft   hf_interop.from_hf; ids/labels from tokenizer.encode_conversation; the step's
            conversations packed with document masking (train_sft's packer) so there is no padding;
            loss = model(..., labels, reduction='sum') / trained tokens (LM head on trained positions
            only); AdamW from configure_optimizers.
  hf        transformers Qwen3ForCausalLM, its own loss (labels -100 outside the assistant mask),
            right padding to the longest sequence of the batch, torch.optim.AdamW, plain loop.
  trl       trl.SFTTrainer(assistant_only_loss=True) on a datasets.Dataset of the same conversations,
            sequential sampling, padding to longest, gradient checkpointing off (same compute).
Ablations (--ablations): nanosft_full_logits (the unoptimized path: full (tokens x vocab) logits,
then cross-entropy), nanosft_padded (no packing: the peers' exact batches, padding to longest),
nanosft_fused_adamw (torch.optim.AdamW(fused=True) instead of configure_optimizers' default on CPU),
nanosft_recompute_ce (the LM head + cross-entropy in checkpointed chunks of 4096 rows, recomputed
in backward: what model_builder did before linear_cross_entropy computed the gradients in its forward).

trained tokens = tokens whose label is trained; total tokens = all positions computed incl. padding.
Peak memory: peak RSS of the contender's process on CPU (ru_maxrss), max_memory_allocated on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

CONTENDERS = ('nanosft', 'hf', 'trl')
ABLATIONS = ('nanosft_full_logits', 'nanosft_padded', 'nanosft_fused_adamw', 'nanosft_recompute_ce')
LR, BETAS, WD, GRAD_CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0
RECOMPUTE_CHUNK_ROWS = 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--contenders', default=','.join(CONTENDERS),
                   help=f'comma list from {CONTENDERS + ABLATIONS}')
    p.add_argument('--ablations', action='store_true', help='also run ' + ', '.join(ABLATIONS))
    p.add_argument('--full_logits', action='store_true',
                   help='nanosft contender passes return_logits=True (builds the full logits)')
    p.add_argument('--data', default=common.GSM8K)
    p.add_argument('--batch_size', type=int, default=4, help='conversations per optimizer step')
    p.add_argument('--max_length', type=int, default=1024, help='per-conversation token cap (all)')
    p.add_argument('--block_size', type=int, default=1024, help='nanosft packing row length')
    p.add_argument('--packed_rows', type=int, default=1,
                   help='nanosft packed rows per step (1 x 1024 ~ the peers\' 4 padded conversations)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--steps', type=int, default=3, help='timed steps after warmup')
    p.add_argument('--n_layer', type=int, default=2)
    p.add_argument('--n_embd', type=int, default=128)
    p.add_argument('--n_head', type=int, default=2)
    p.add_argument('--n_kv_head', type=int, default=1)
    p.add_argument('--intermediate', type=int, default=384)
    p.add_argument('--vocab_size', type=int, default=151936)
    p.add_argument('--threads', type=int, default=2, help='torch intra-op threads, same for all')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda')
    p.add_argument('--padding_block_size', type=int, default=1024,
                   help='block size for the whole-train-set packing padding report (0 = skip)')
    p.add_argument('--json', default=None, help='write all results here')
    p.add_argument('--workdir', default=None, help='where the shared model dir goes (default: tmp)')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--model_dir', default=None, help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Child side: one contender, one process.

def _setup_torch(args):
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    if dev == 'auto':
        dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch, torch.device(dev)


def _sync(torch, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _pad_batch(seqs, pad_id):
    """Right padding to the longest: (ids, labels, attention_mask) as python lists."""
    T = max(len(ids) for ids, _ in seqs)
    ids = [s + [pad_id] * (T - len(s)) for s, _ in seqs]
    labels = [lab + [-100] * (T - len(lab)) for _, lab in seqs]
    mask = [[1] * len(s) + [0] * (T - len(s)) for s, _ in seqs]
    return ids, labels, mask


def _trained(labels_rows) -> int:
    # label[0] of a row is never a target (shifted out); SFT rows start with <|im_start|>, untrained
    return sum(sum(1 for x in row[1:] if x != -100) for row in labels_rows)


def recompute_ce_loss(model):
    """The previous loss path: trained positions only, in chunks whose logits are recomputed in
    backward by activation checkpointing (one extra LM-head matmul, all logits of a chunk kept twice)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def ce_sum(h, t):
        return F.cross_entropy(model.lm_head(h).float(), t, reduction='sum')

    def loss(h, labels, reduction, trained_index=None):
        targets = labels[:, 1:]
        keep = targets != -100
        h_sel, t_sel = h[:, :-1][keep], targets[keep]
        if t_sel.numel() == 0:
            return h.sum() * 0.0
        total = h_sel.new_zeros((), dtype=torch.float32)
        for s in range(0, t_sel.numel(), RECOMPUTE_CHUNK_ROWS):
            total = total + checkpoint(ce_sum, h_sel[s:s + RECOMPUTE_CHUNK_ROWS],
                                       t_sel[s:s + RECOMPUTE_CHUNK_ROWS], use_reentrant=False)
        return total / t_sel.numel() if reduction == 'mean' else total
    return loss


def _result(name, device, times, trained, total, extra=None):
    import torch
    t = sum(times)
    res = {'contender': name, 'device': str(device), 'steps': len(times),
           'step_s': t / len(times), 'trained_tokens': trained, 'total_tokens': total,
           'trained_tok_s': trained / t, 'total_tok_s': total / t,
           'padding_share': 1.0 - _real_tokens(total, extra) / total if total else 0.0,
           'peak_rss_bytes': common.peak_rss_bytes()}
    if device.type == 'cuda':
        res['peak_cuda_bytes'] = torch.cuda.max_memory_allocated()
    res.update(extra or {})
    res.pop('_real_tokens', None)
    if res.get('cpu_times'):  # process CPU seconds (all threads): steadier than wall time when shared
        res['cpu_s'] = sum(res['cpu_times']) / len(res['cpu_times'])
        res['trained_tok_cpu_s'] = trained / sum(res['cpu_times'])
    return res


def _real_tokens(total, extra):
    return (extra or {}).get('_real_tokens', total)


def child_nanosft(args, name):
    """nanoSFT's step as train_sft.py runs it: SFTDataset rows (packed with document masking at
    block_size, or padded), train_sft.forward_backward (sum loss / trained tokens), clip, AdamW."""
    common.ensure_repo_on_path()
    torch, device = _setup_torch(args)
    import torch.nn.functional as F
    from hf_interop import from_hf
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    from train_sft import SFTDataset, forward_backward
    full_logits = args.full_logits or name == 'nanosft_full_logits'
    packed = name != 'nanosft_padded'
    tok = load_tokenizer('qwen3')
    n_steps = args.warmup + args.steps
    # enough conversations for n_steps packed rows; the padded variant takes batch_size per step
    convs = common.gsm8k_conversations(args.data, args.batch_size * n_steps * 4)
    seqs = [tuple(x[:args.max_length] for x in encode_conversation(c, tok)) for c in convs]
    if packed:
        ds = SFTDataset(seqs, args.block_size, packing=True, pad_id=tok.pad_id, shuffle=False)
        rows_per_step = args.packed_rows
    else:
        ds = SFTDataset(seqs, args.max_length, packing=False, pad_id=tok.pad_id, shuffle=False)
        rows_per_step = args.batch_size
    units = ds.units(0)
    if len(units) < rows_per_step * n_steps:
        raise SystemExit(f'{name}: only {len(units)} rows for {n_steps} steps')
    model = from_hf(args.model_dir).to(device)
    model.train()
    opt = model.configure_optimizers(WD, LR, BETAS, device.type)
    if name == 'nanosft_recompute_ce':
        model._chunked_loss = recompute_ce_loss(model)
    if name == 'nanosft_fused_adamw':  # fused=True is CUDA-only in configure_optimizers
        groups = [{'params': g['params'], 'weight_decay': g['weight_decay']} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)

    def full_logits_model(input_ids, labels, position_ids=None, doc_ids=None, reduction='sum',
                          trained_index=None):
        """The unoptimized path: (B, T, V) logits for every position, then cross-entropy."""
        logits, _ = model(input_ids, position_ids=position_ids, doc_ids=doc_ids)
        return logits, F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100, reduction='sum')

    step_model = full_logits_model if full_logits else model
    rss_before = common.rss_bytes()
    times, cpu, trained, total, real, losses = [], [], 0, 0, 0, []
    for step in range(n_steps):
        step_units = units[step * rows_per_step:(step + 1) * rows_per_step]
        batch = ds.collate(step_units)
        _sync(torch, device)
        t0, c0 = time.perf_counter(), time.process_time()
        stats = forward_backward(step_model, [batch], device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(torch, device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(stats[0] / stats[1].clamp(min=1)))
        if step >= args.warmup:
            times.append(dt)
            cpu.append(dc)
            trained += int(stats[1])
            total += batch['input_ids'].numel()
            real += sum(min(len(seqs[i][0]), ds.block_size) for u in step_units for i in u)
    return _result(name, device, times, trained, total, {
        '_real_tokens': real, 'cpu_times': cpu, 'rss_before_train_bytes': rss_before, 'first_loss': losses[0],
        'losses': losses, 'rows_per_step': rows_per_step, 'row_len': ds.block_size if packed else None,
        'trained_per_example': [_trained([lab]) for _, lab in seqs[:args.batch_size * n_steps]]})


def child_hf(args, name):
    torch, device = _setup_torch(args)
    from transformers import Qwen3ForCausalLM
    tok = common.hf_qwen_tokenizer()
    convs = common.gsm8k_conversations(args.data, args.batch_size * (args.warmup + args.steps))
    seqs = [common.hf_encode(tok, c, args.max_length) for c in convs]
    model = Qwen3ForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                             attn_implementation='sdpa').to(device)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': WD},
                             {'params': no_decay, 'weight_decay': 0.0}], lr=LR, betas=BETAS)
    rss_before = common.rss_bytes()
    times, cpu, trained, total, real, losses = [], [], 0, 0, 0, []
    for step in range(args.warmup + args.steps):
        chunk = seqs[step * args.batch_size:(step + 1) * args.batch_size]
        pid, plab, pmask = _pad_batch(chunk, tok.pad_token_id)
        ids = torch.tensor(pid, device=device)
        labels = torch.tensor(plab, device=device)
        mask = torch.tensor(pmask, device=device)
        _sync(torch, device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(torch, device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(loss.detach()))
        if step >= args.warmup:
            times.append(dt)
            cpu.append(dc)
            trained += _trained(plab)
            total += ids.numel()
            real += int(mask.sum())
    return _result(name, device, times, trained, total, {
        '_real_tokens': real, 'cpu_times': cpu, 'rss_before_train_bytes': rss_before, 'first_loss': losses[0],
        'losses': losses, 'trained_per_example': [_trained([lab]) for _, lab in seqs]})


def child_trl(args, name):
    torch, device = _setup_torch(args)
    from datasets import Dataset
    from transformers import Qwen3ForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    tok = common.hf_qwen_tokenizer()
    n_steps = args.warmup + args.steps
    convs = common.gsm8k_conversations(args.data, args.batch_size * n_steps)
    ds = Dataset.from_dict({'messages': convs})
    model = Qwen3ForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                             attn_implementation='sdpa')
    out_dir = tempfile.mkdtemp(prefix='bench_trl_')
    cfg = SFTConfig(
        output_dir=out_dir, max_steps=n_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        weight_decay=WD, max_grad_norm=GRAD_CLIP, lr_scheduler_type='constant', warmup_steps=0,
        max_length=args.max_length, assistant_only_loss=True, packing=False,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=device.type == 'cpu',
        report_to='none', save_strategy='no', eval_strategy='no', logging_steps=10 ** 6,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, train_sampling_strategy='sequential',
        dataset_num_proc=None)

    class Counting(SFTTrainer):
        """Counts what each step really computed (positions, real tokens, trained targets)."""
        batches = []

        def compute_loss(self, model, inputs, *a, **kw):
            lab = inputs['labels']
            self.batches.append((inputs['input_ids'].numel(), int(inputs['attention_mask'].sum()),
                                 int((lab[:, 1:] != -100).sum())))
            return super().compute_loss(model, inputs, *a, **kw)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0, self.c0, self.times, self.cpu = None, None, [], []

        def on_step_begin(self, a, state, control, **kw):
            _sync(torch, device)
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            _sync(torch, device)
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    timer = Timer()
    trainer = Counting(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                       callbacks=[timer])
    train_ds = trainer.train_dataset
    per_example = [sum(1 for x in lab[1:] if x != -100) for lab in train_ds['labels']]
    rss_before = common.rss_bytes()
    out = trainer.train()
    w = args.warmup
    batches = Counting.batches[w:]
    losses = [h['loss'] for h in trainer.state.log_history if 'loss' in h]
    return _result(name, trainer.args.device, timer.times[w:], sum(b[2] for b in batches),
                   sum(b[0] for b in batches), {
                       '_real_tokens': sum(b[1] for b in batches), 'cpu_times': timer.cpu[w:],
                       'rss_before_train_bytes': rss_before,
                       'trl_train_loss': out.training_loss, 'losses': losses,
                       'trained_per_example': per_example})


def run_child(args):
    fn = {'hf': child_hf, 'trl': child_trl}.get(args.child, child_nanosft)
    res = fn(args, args.child)
    with open(args.out + '.tmp', 'w') as f:
        json.dump(res, f)
    os.replace(args.out + '.tmp', args.out)


# ----------------------------------------------------------------------------------------------
# Parent side: shared model, one subprocess per contender, the table.

def first_fit(order, lengths, block_size) -> int:
    """Rows needed when each example goes into the first open row with room (no splitting)."""
    free: list[int] = []
    for i in order:
        n = min(int(lengths[i]), block_size)
        for r, f in enumerate(free):
            if f >= n:
                free[r] -= n
                break
        else:
            free.append(block_size - n)
    return len(free)


def gsm8k_padding_report(args) -> dict:
    """Padding share over the whole GSM8K train set: train_sft's packing (SFTDataset, seeded shuffle
    as in training) at block_size, vs padding to the longest of each batch; plus what first-fit
    packing of the same shuffled order would give."""
    common.ensure_repo_on_path()
    import numpy as np
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    from train_sft import SFTDataset
    tok = load_tokenizer('qwen3')
    B = args.padding_block_size
    seqs = [encode_conversation(c, tok) for c in common.gsm8k_conversations(args.data)]
    ds = SFTDataset(seqs, B, packing=True, pad_id=tok.pad_id, seed=1337)
    lengths = np.minimum(ds.lengths, B)
    real = int(lengths.sum())
    rows = ds.units(0)
    order = np.random.default_rng([1337, 0]).permutation(len(seqs))
    padded = sum(int(lengths[order[i:i + args.batch_size]].max()) * len(order[i:i + args.batch_size])
                 for i in range(0, len(order), args.batch_size))
    return {'block_size': B, 'examples': len(seqs), 'real_tokens': real,
            'packing_share': 1 - real / (len(rows) * B), 'packing_rows': len(rows),
            'packing_source': 'train_sft.SFTDataset(packing=True).units(0)',
            'first_fit_share': 1 - real / (first_fit(order, lengths, B) * B),
            'pad_to_longest_share': 1 - real / padded}


def fmt_bytes(n):
    return f'{n / 2 ** 20:,.0f} MiB'


def print_table(results, base='nanosft'):
    ref = next((r for r in results if r['contender'] == base and 'error' not in r), None)
    mem_key = 'peak_cuda_bytes' if results and 'peak_cuda_bytes' in results[0] else 'peak_rss_bytes'
    head = (f"{'contender':<22}{'step s':>8}{'trained tok/s':>15}{'total tok/s':>13}{'padding':>9}"
            f"{'peak mem':>12}{'train mem':>11}{'speed vs':>10}{'mem vs':>8}{'cpu s':>8}"
            f"{'trained tok/cpu-s':>19}{'cpu speed vs':>14}")
    lines = [head, '-' * len(head)]
    for r in results:
        if 'error' in r:
            lines.append(f"{r['contender']:<22}FAILED: {r['error'][-200:]}")
            continue
        train_mem = r[mem_key] - r.get('rss_before_train_bytes', 0) if mem_key == 'peak_rss_bytes' \
            else r[mem_key]
        sp = mm = cs = ''
        if ref is not None:
            sp = f"{ref['trained_tok_s'] / r['trained_tok_s']:.2f}x"
            mm = f"{ref[mem_key] / r[mem_key]:.2f}x"
            if 'trained_tok_cpu_s' in ref and 'trained_tok_cpu_s' in r:
                cs = f"{ref['trained_tok_cpu_s'] / r['trained_tok_cpu_s']:.2f}x"
        lines.append(f"{r['contender']:<22}{r['step_s']:>8.2f}{r['trained_tok_s']:>15,.0f}"
                     f"{r['total_tok_s']:>13,.0f}{r['padding_share']:>9.1%}{fmt_bytes(r[mem_key]):>12}"
                     f"{fmt_bytes(train_mem):>11}{sp:>10}{mm:>8}{r.get('cpu_s', 0):>8.2f}"
                     f"{r.get('trained_tok_cpu_s', 0):>19,.0f}{cs:>14}")
    lines.append(f"speed vs = nanosft trained tok/s / contender's; mem vs = nanosft peak / contender's "
                 f"(goal: speed >= 1.5x, mem <= 0.6x). train mem = peak RSS - RSS before the first step.\n"
                 f"cpu s = process CPU seconds per step (all threads); cpu speed vs = the same ratio per "
                 f"CPU-second, which neighbours on a shared machine disturb far less than wall time.")
    print('\n'.join(lines))
    return lines


def sanity(results) -> dict:
    """Same conversations must give every contender the same trained targets per example."""
    per = {r['contender']: r.get('trained_per_example') for r in results if 'error' not in r}
    names = [n for n, v in per.items() if v]
    out = {'same_trained_tokens_per_example': True, 'mismatches': {}}
    for n in names[1:]:
        a, b = per[names[0]], per[n]
        bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y] + ([-1] if len(a) != len(b) else [])
        if bad:
            out['same_trained_tokens_per_example'] = False
            out['mismatches'][f'{names[0]} vs {n}'] = bad[:10]
    firsts = {r['contender']: (r.get('losses') or [None])[0] for r in results if 'error' not in r}
    out['first_step_loss'] = firsts
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    names = [c for c in args.contenders.split(',') if c]
    if args.ablations:
        names += [a for a in ABLATIONS if a not in names]
    unknown = [n for n in names if n not in CONTENDERS + ABLATIONS]
    if unknown:
        raise SystemExit(f'--contenders: unknown {unknown}; choose from {CONTENDERS + ABLATIONS}')
    if not os.path.exists(args.data):
        raise SystemExit(f'--data: {args.data} not found (GSM8K train.jsonl)')
    t_start = time.time()
    work = tempfile.mkdtemp(prefix='bench_train_', dir=args.workdir)
    model_dir = os.path.join(work, 'model')
    common.write_random_qwen3(model_dir, args.n_layer, args.n_embd, args.n_head, args.n_kv_head,
                              args.intermediate, args.vocab_size)
    fwd, skip = [], False  # the child gets the same options, minus --json
    for a in (argv if argv is not None else sys.argv[1:]):
        if skip or a.startswith('--json='):
            skip = False
        elif a == '--json':
            skip = True
        else:
            fwd.append(a)
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
               HF_DATASETS_OFFLINE='1')
    for name in names:
        if name == 'trl':
            try:
                import trl  # noqa: F401
            except ImportError:
                print('trl: not installed (pip install -r requirements-bench.txt), skipped')
                continue
        out = os.path.join(work, f'{name}.json')
        cmd = [sys.executable, os.path.abspath(__file__), *fwd, '--child', name,
               '--model_dir', model_dir, '--out', out]
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            results.append({'contender': name, 'error': (proc.stderr or proc.stdout).strip()})
            print(f'{name}: FAILED\n{proc.stderr[-3000:]}', file=sys.stderr)
            continue
        with open(out) as f:
            results.append(json.load(f))
        print(f'{name}: done in {time.time() - t0:.0f} s', file=sys.stderr)
    print(f"\nmodel: Qwen3-shaped, vocab {args.vocab_size}, {args.n_layer} layers, hidden {args.n_embd}, "
          f"heads {args.n_head}/{args.n_kv_head}, fp32; {args.batch_size} GSM8K conversations/step, "
          f"max_length {args.max_length}, {args.warmup} warmup + {args.steps} timed steps, "
          f"{args.threads} threads; {common.machine_description()}")
    table = print_table(results)
    checks = sanity(results)
    print(f"sanity: same trained tokens per example across contenders: "
          f"{checks['same_trained_tokens_per_example']} {checks['mismatches'] or ''}")
    print('first-step loss (same weights, same data):',
          ', '.join(f'{k} {v:.6f}' for k, v in checks['first_step_loss'].items() if v is not None))
    pad = gsm8k_padding_report(args) if args.padding_block_size else None
    if pad:
        print(f"GSM8K train ({pad['examples']} conversations, {pad['real_tokens']:,} tokens) padding share: "
              + ', '.join(f'{k} {v:.2%}' for k, v in pad.items() if k.endswith('share'))
              + f" at block_size {pad['block_size']} [{pad['packing_source']}; first_fit = same shuffled "
              f"order, each example into the first row with room; pad_to_longest = batches of {args.batch_size}]")
    print(f'total wall time {time.time() - t_start:.0f} s')
    if args.json:
        blob = {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                'machine': common.machine_description(), 'commit': common.git_commit(),
                'args': {k: v for k, v in vars(args).items() if k not in ('child', 'model_dir', 'out')},
                'results': [{k: v for k, v in r.items() if k != 'trained_per_example'} for r in results],
                'sanity': checks, 'gsm8k_padding': pad, 'table': table}
        with open(args.json + '.tmp', 'w') as f:
            json.dump(blob, f, indent=1)
        os.replace(args.json + '.tmp', args.json)
    return 0 if all('error' not in r for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
