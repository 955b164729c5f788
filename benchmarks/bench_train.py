"""Training-step benchmark on CPU: nanoSFT vs transformers (packed, padded) vs TRL SFTTrainer(packing=True).

    python benchmarks/bench_train.py --json out.json                  # 3 shapes x 4 contenders x 3 repeats
    python benchmarks/bench_train.py --shapes 2x128 --repeats 1       # quick look
    python benchmarks/bench_train.py --growth --json growth.json      # block size 512..4096, dense vs new

The same random Qwen3-shaped model per shape (real 151,936 vocabulary, head_dim 64, GQA, QK-norm,
SwiGLU, tied embeddings, fp32; saved once with save_pretrained, nanoSFT loads it with
hf_interop.from_hf), the same GSM8K conversations in the same steps for every contender, the same
AdamW settings, grad clipping, intra-op threads. The steps are TRL's: its best-fit-decreasing packer
(trl.pack_dataset, strategy 'bfd') run on the conversations' lengths at --block_size decides which
conversations go together; every contender then trains exactly those conversations per step:
  nanosft     train_sft.SFTDataset packs the step's conversations into one row of block_size
              (document masking, the attention path 'auto' picks: per-document SDPA on CPU),
              train_sft.forward_backward (LM head on trained positions only), clip, AdamW.
  hf_packed   transformers Qwen3ForCausalLM on the step's conversations concatenated into one row,
              position_ids restarting per conversation, no attention mask, use_cache=False (with a
              cache transformers stops detecting the packed documents), labels -100 outside the
              assistant turns: its first-step loss is checked against hf_padded's.
  hf_padded   the same conversations as a batch right-padded to the longest, attention_mask.
              Both transformers loops: torch.optim.AdamW(fused=True), the fastest on CPU (as nanoSFT).
  trl_packed  trl.SFTTrainer(packing=True, assistant_only_loss=True): BFD packing, padding-free
              batches with position_ids (TRL sets use_cache=False), gradient checkpointing and bf16
              off (TRL's CPU defaults would change the work), its fused AdamW; timed by a callback.
Ablations: nanosft_dense (attention='dense', the (T, T) mask it replaced), nanosft_full_logits.

Each contender runs in its own process; contenders are interleaved (A B C D A B C D ...) for
--repeats rounds and the tables give medians over the rounds of: trained tokens per CPU-second
(CPU = user + sys of the process over the timed steps, all threads; steadier than wall time on a
shared machine) and peak RSS (ru_maxrss: the whole process, Python and torch included).

--growth: nanoSFT at --growth_shape with rows of 512 ... 4096 tokens (conversations packed by
train_sft's own best-fit packer), the new attention path vs the dense mask, interleaved: CPU
seconds per step and per token, peak RSS, and the RSS growth in training (peak - RSS before the model).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

CONTENDERS = ('nanosft', 'hf_packed', 'hf_padded', 'trl_packed')
ABLATIONS = ('nanosft_dense', 'nanosft_full_logits')
LR, BETAS, WD, GRAD_CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shapes', default=','.join(common.SHAPES), help=f'comma list of {list(common.SHAPES)} or LxC')
    p.add_argument('--contenders', default=','.join(CONTENDERS), help=f'from {CONTENDERS + ABLATIONS}')
    p.add_argument('--ablations', action='store_true', help='also run ' + ', '.join(ABLATIONS))
    p.add_argument('--repeats', type=int, default=3, help='interleaved rounds; the tables give medians')
    p.add_argument('--block_size', type=int, default=1024, help='TRL BFD pack size = nanoSFT row length')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--steps', type=int, default=3, help='timed steps after warmup')
    p.add_argument('--threads', type=int, default=2, help='torch intra-op threads, same for all')
    p.add_argument('--growth', action='store_true', help='run the block-size growth comparison instead')
    p.add_argument('--growth_shape', default='6x512')
    p.add_argument('--growth_blocks', default='512,1024,2048,4096')
    p.add_argument('--data', default=common.GSM8K)
    p.add_argument('--json', default=None, help='write all results here')
    p.add_argument('--workdir', default=None, help='where the model dirs go (default: a tmp dir)')
    p.add_argument('--shape', default=None, help=argparse.SUPPRESS)
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--model_dir', default=None, help=argparse.SUPPRESS)
    p.add_argument('--steps_file', default=None, help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Child side: one contender, one process, the steps given in --steps_file.

def _setup_torch(args):
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch


def _load_steps(args):
    with open(args.steps_file) as f:
        plan = json.load(f)
    convs = common.gsm8k_conversations(args.data, plan['n_conversations'])
    return plan['steps'], convs


def _trained(labels_rows) -> int:
    # label[0] of a row is never a target (shifted out); SFT rows start with <|im_start|>, untrained
    return sum(sum(1 for x in row[1:] if x != -100) for row in labels_rows)


def _result(name, times, cpu, trained, tokens, losses, rss_before, extra=None):
    return {'contender': name, 'steps': len(times), 'step_s': sum(times) / len(times),
            'cpu_s': sum(cpu) / len(cpu), 'trained_tokens': trained, 'total_tokens': tokens,
            'trained_tok_cpu_s': trained / sum(cpu), 'trained_tok_s': trained / sum(times),
            'peak_rss_bytes': common.peak_rss_bytes(), 'rss_before_train_bytes': rss_before,
            'first_loss': losses[0], 'losses': losses, **(extra or {})}


def _timed_loop(torch, args, name, batches, run_step, rss_before, extra=None):
    """batches: (batch, trained targets, tokens) per step; run_step(batch) -> loss (a float)."""
    times, cpu, trained, tokens, losses = [], [], 0, 0, []
    for step, (batch, n_trained, n_tokens) in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(run_step(batch))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if step >= args.warmup:
            times.append(dt)
            cpu.append(dc)
            trained += n_trained
            tokens += n_tokens
    return _result(name, times, cpu, trained, tokens, losses, rss_before, extra)


def child_nanosft(args, name):
    """train_sft's step: the step's conversations packed into one row (SFTDataset.collate of one
    unit), forward_backward (sum loss / trained tokens), clip, AdamW from configure_optimizers."""
    common.ensure_repo_on_path()
    torch = _setup_torch(args)
    import torch.nn.functional as F
    from hf_interop import from_hf
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    from train_sft import SFTDataset, forward_backward
    steps, convs = _load_steps(args)
    tok = load_tokenizer('qwen3')
    seqs = [encode_conversation(c, tok) for c in convs]
    ds = SFTDataset(seqs, args.block_size, packing=True, pad_id=tok.pad_id, shuffle=False)
    batches = [ds.collate([unit]) for unit in steps]
    rss_before = common.rss_bytes()
    model = from_hf(args.model_dir)
    model.config.attention = 'dense' if name == 'nanosft_dense' else 'auto'
    model.train()
    opt = model.configure_optimizers(WD, LR, BETAS, 'cpu')

    def full_logits_model(input_ids, labels, reduction='sum', trained_index=None, **kw):
        """The unoptimized head: (B, T, V) logits for every position, then cross-entropy."""
        logits, _ = model(input_ids, **kw)
        return logits, F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100, reduction='sum')
    step_model = full_logits_model if name == 'nanosft_full_logits' else model

    def run_step(batch):
        stats = forward_backward(step_model, [batch], 'cpu')
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(stats[0] / stats[1].clamp(min=1))
    work = [(b, _trained(b['labels'].tolist()), b['input_ids'].numel()) for b in batches]
    return _timed_loop(torch, args, name, work, run_step, rss_before,
                       {'trained_per_step': [w[1] for w in work], 'row_len': args.block_size})


def child_hf(args, name):
    torch = _setup_torch(args)
    from transformers import Qwen3ForCausalLM
    steps, convs = _load_steps(args)
    tok = common.hf_qwen_tokenizer()
    seqs = [common.hf_encode(tok, c, args.block_size) for c in convs]
    work = []
    for unit in steps:
        if name == 'hf_padded':
            T = max(len(seqs[i][0]) for i in unit)
            ids = [seqs[i][0] + [tok.pad_token_id] * (T - len(seqs[i][0])) for i in unit]
            labels = [seqs[i][1] + [-100] * (T - len(seqs[i][1])) for i in unit]
            mask = [[1] * len(seqs[i][0]) + [0] * (T - len(seqs[i][0])) for i in unit]
            batch = dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), attention_mask=torch.tensor(mask))
        else:   # one row, positions restarting per conversation, no mask, no cache
            ids = [t for i in unit for t in seqs[i][0]]
            labels = [t for i in unit for t in [-100] + seqs[i][1][1:]]   # no target across documents
            pos = [p for i in unit for p in range(len(seqs[i][0]))]
            batch = dict(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]),
                         position_ids=torch.tensor([pos]), use_cache=False)
        work.append((batch, _trained(batch['labels'].tolist()), batch['input_ids'].numel()))
    rss_before = common.rss_bytes()
    model = Qwen3ForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation='sdpa')
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': WD},   # fused: its best CPU setting too
                             {'params': no_decay, 'weight_decay': 0.0}], lr=LR, betas=BETAS, fused=True)

    def run_step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return _timed_loop(torch, args, name, work, run_step, rss_before,
                       {'trained_per_step': [w[1] for w in work]})


def child_trl(args, name):
    torch = _setup_torch(args)
    from datasets import Dataset
    from transformers import Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer
    steps, convs = _load_steps(args)
    tok = common.hf_qwen_tokenizer()
    model = Qwen3ForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation='sdpa')
    n_steps = len(steps)
    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix='bench_trl_'), max_steps=n_steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=1, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        weight_decay=WD, max_grad_norm=GRAD_CLIP, lr_scheduler_type='constant', warmup_steps=0,
        max_length=args.block_size, packing=True, packing_strategy='bfd', assistant_only_loss=True,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to='none',
        save_strategy='no', eval_strategy='no', logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, train_sampling_strategy='sequential', dataset_num_proc=None)

    class Counting(SFTTrainer):
        """Counts what each step computed (tokens, trained targets) and its loss."""
        seen = []

        def compute_loss(self, model, inputs, *a, **kw):
            self.seen.append((inputs['input_ids'].numel(), int((inputs['labels'][:, 1:] != -100).sum())))
            return super().compute_loss(model, inputs, *a, **kw)

    timer = common.trl_step_timer()
    trainer = Counting(model=model, args=cfg, train_dataset=Dataset.from_dict({'messages': convs}),
                       processing_class=tok, callbacks=[timer])
    # TRL's own packing must have made the steps every other contender trains
    packed = [list(s) for s in trainer.train_dataset['seq_lengths'][:n_steps]]
    rss_before = common.rss_bytes()
    trainer.train()
    w = args.warmup
    losses = [h['loss'] for h in trainer.state.log_history if 'loss' in h]
    seen = Counting.seen
    return _result(name, timer.times[w:], timer.cpu[w:], sum(s[1] for s in seen[w:]),
                   sum(s[0] for s in seen[w:]), losses, rss_before,
                   {'trained_per_step': [s[1] for s in seen], 'trl_step_lengths': packed})


def run_child(args):
    fn = child_trl if args.child == 'trl_packed' else child_hf if args.child.startswith('hf') else child_nanosft
    res = fn(args, args.child)
    with open(args.out + '.tmp', 'w') as f:
        json.dump(res, f)
    os.replace(args.out + '.tmp', args.out)


# ----------------------------------------------------------------------------------------------
# Parent side: the steps, one subprocess per contender and round, the tables.

def trl_steps(args, n_steps: int) -> dict:
    """The conversations of each step as TRL's BFD packer groups them (its trainer trains these
    packed rows in order): lengths from nanoSFT's encoding, which equals the transformers
    chat-template encoding TRL uses (checked per step against TRL's own packing in its child)."""
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    tok = load_tokenizer('qwen3')
    n_conv = n_steps * max(2, args.block_size // 100)
    convs = common.gsm8k_conversations(args.data, n_conv)
    lengths = [min(len(encode_conversation(c, tok)[0]), args.block_size) for c in convs]
    try:
        from datasets import Dataset
        from trl import pack_dataset
        packed = pack_dataset(Dataset.from_dict({'input_ids': [[i] * n for i, n in enumerate(lengths)]}),
                              args.block_size, strategy='bfd')
        steps = [list(dict.fromkeys(row)) for row in packed['input_ids'][:n_steps]]
        source = 'trl.pack_dataset(bfd)'
    except ImportError:   # without TRL: train_sft's best-fit packer in file order
        from sft_data import pack_best_fit
        steps = pack_best_fit(range(n_conv), lengths, args.block_size)[:n_steps]
        source = 'sft_data.pack_best_fit'
    return {'n_conversations': n_conv, 'steps': steps, 'source': source,
            'step_lengths': [[lengths[i] for i in s] for s in steps]}


def nanosft_steps(args, block: int, n_steps: int) -> dict:
    """Rows of `block` tokens packed by train_sft's own best-fit packer (for --growth)."""
    from sft_data import pack_best_fit
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    tok = load_tokenizer('qwen3')
    n_conv = n_steps * block // 120
    convs = common.gsm8k_conversations(args.data, n_conv)
    lengths = [min(len(encode_conversation(c, tok)[0]), block) for c in convs]
    return {'n_conversations': n_conv, 'steps': pack_best_fit(range(n_conv), lengths, block)[:n_steps],
            'source': 'sft_data.pack_best_fit'}


def run_rounds(args, jobs, env) -> list[dict]:
    """jobs: (key, contender, extra argv) run in order, args.repeats rounds; -> results with 'key'."""
    out = []
    for rnd in range(args.repeats):
        for key, name, extra in jobs:
            path = os.path.join(args.workdir, f'{name}.json')
            cmd = [sys.executable, os.path.abspath(__file__), '--child', name, '--out', path,
                   '--threads', str(args.threads), '--warmup', str(args.warmup), '--data', args.data, *extra]
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(path):
                print(f'{key} {name}: FAILED\n{proc.stderr[-3000:]}', file=sys.stderr)
                out.append({'key': key, 'contender': name, 'round': rnd, 'error': proc.stderr[-3000:]})
                continue
            with open(path) as f:
                res = json.load(f)
            os.remove(path)
            out.append(dict(res, key=key, round=rnd))
            print(f'round {rnd + 1}/{args.repeats} {key} {name}: {res["trained_tok_cpu_s"]:,.0f} trained tok/CPU-s, '
                  f'peak RSS {res["peak_rss_bytes"] / 2 ** 20:,.0f} MiB ({time.time() - t0:.0f} s)', file=sys.stderr)
    return out


def medians(results, key, name) -> dict | None:
    runs = [r for r in results if r['key'] == key and r['contender'] == name and 'error' not in r]
    if not runs:
        return None
    med = lambda k: statistics.median(r[k] for r in runs)
    return {'contender': name, 'runs': len(runs), 'trained_tok_cpu_s': med('trained_tok_cpu_s'),
            'trained_tok_s': med('trained_tok_s'), 'cpu_s': med('cpu_s'), 'step_s': med('step_s'),
            'peak_rss_bytes': med('peak_rss_bytes'),
            'train_rss_bytes': statistics.median(r['peak_rss_bytes'] - r['rss_before_train_bytes'] for r in runs),
            'trained_tokens': runs[0]['trained_tokens'], 'total_tokens': runs[0]['total_tokens'],
            'first_loss': runs[0]['first_loss'], 'trained_per_step': runs[0].get('trained_per_step')}


def shape_table(shape, rows) -> list[str]:
    mib = lambda b: f'{b / 2 ** 20:,.0f}'
    ref = next((r for r in rows if r['contender'] == 'nanosft'), None)
    lines = [f'### {shape}', '', '| contender | trained tok / CPU-s | CPU s / step | peak RSS MiB | RSS growth MiB | '
             'nanoSFT speed ratio | nanoSFT memory ratio | first-step loss |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        sp = mm = ''
        if ref:
            sp = f"{ref['trained_tok_cpu_s'] / r['trained_tok_cpu_s']:.2f}x"
            mm = f"{ref['peak_rss_bytes'] / r['peak_rss_bytes']:.2f}x"
        lines.append(f"| {r['contender']} | {r['trained_tok_cpu_s']:,.0f} | {r['cpu_s']:.2f} | {mib(r['peak_rss_bytes'])} | "
                     f"{mib(r['train_rss_bytes'])} | {sp} | {mm} | {r['first_loss']:.6f} |")
    return lines


def sanity(rows) -> dict:
    """Every contender trains the same targets per step; packed transformers = padded transformers."""
    per = {r['contender']: r['trained_per_step'] for r in rows if r.get('trained_per_step')}
    ref = per.get('hf_padded') or next(iter(per.values()), None)
    out = {'same_trained_tokens_per_step': all(v == ref for v in per.values())}
    loss = {r['contender']: r['first_loss'] for r in rows}
    if 'hf_packed' in loss and 'hf_padded' in loss:
        out['hf_packed_minus_hf_padded_first_loss'] = loss['hf_packed'] - loss['hf_padded']
    if 'nanosft' in loss and 'hf_padded' in loss:
        out['nanosft_minus_hf_padded_first_loss'] = loss['nanosft'] - loss['hf_padded']
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    if not os.path.exists(args.data):
        raise SystemExit(f'--data: {args.data} not found (GSM8K train.jsonl)')
    names = [c for c in args.contenders.split(',') if c] + (list(ABLATIONS) if args.ablations else [])
    unknown = [n for n in names if n not in CONTENDERS + ABLATIONS]
    if unknown:
        raise SystemExit(f'--contenders: unknown {unknown}; choose from {CONTENDERS + ABLATIONS}')
    if 'trl_packed' in names:
        try:
            import trl  # noqa: F401
        except ImportError:
            print('trl_packed: trl not installed (make install-bench), skipped', file=sys.stderr)
            names.remove('trl_packed')
    args.workdir = tempfile.mkdtemp(prefix='bench_train_', dir=args.workdir)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    t_start, load_before = time.time(), os.getloadavg()
    n_steps = args.warmup + args.steps
    jobs, meta = [], {}

    def model_dir(shape):
        path = os.path.join(args.workdir, f'model_{shape}')
        if not os.path.exists(path):
            common.write_random_qwen3(path, *common.shape(shape))
        return path

    def steps_file(key, plan):
        path = os.path.join(args.workdir, f'steps_{key}.json')
        with open(path, 'w') as f:
            json.dump(plan, f)
        meta[key] = {k: v for k, v in plan.items() if k != 'n_conversations'}
        return path

    if args.growth:
        for block in [int(b) for b in args.growth_blocks.split(',')]:
            key = f'{args.growth_shape}@{block}'
            sf = steps_file(key, nanosft_steps(args, block, n_steps))
            for name in ('nanosft', 'nanosft_dense'):
                jobs.append((key, name, ['--model_dir', model_dir(args.growth_shape), '--steps_file', sf,
                                         '--block_size', str(block)]))
    else:
        for shape in args.shapes.split(','):
            sf = steps_file(shape, trl_steps(args, n_steps))
            for name in names:
                jobs.append((shape, name, ['--model_dir', model_dir(shape), '--steps_file', sf,
                                           '--block_size', str(args.block_size)]))
    results = run_rounds(args, jobs, env)
    keys = list(dict.fromkeys(j[0] for j in jobs))
    summary, lines = {}, []
    for key in keys:
        rows = [m for n in dict.fromkeys(j[1] for j in jobs if j[0] == key) if (m := medians(results, key, n))]
        summary[key] = {'medians': rows, 'sanity': sanity(rows)}
        trl_runs = [r for r in results if r['key'] == key and r.get('trl_step_lengths')]
        if trl_runs:   # TRL's own packing made the steps every contender trained
            summary[key]['sanity']['trl_packed_the_same_steps'] = all(
                r['trl_step_lengths'] == meta[key]['step_lengths'] for r in trl_runs)
        lines += shape_table(key, rows) + ['', f"sanity: {summary[key]['sanity']}", '']
    print('\n'.join(lines))
    machine = common.machine_description()
    load_after = os.getloadavg()
    print(f'{machine}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; '
          f'{args.repeats} interleaved rounds, {args.warmup} warm-up + {args.steps} timed steps; '
          f'total wall time {time.time() - t_start:.0f} s')
    if args.json:
        blob = {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'machine': machine,
                'commit': common.git_commit(), 'load_before': load_before, 'load_after': load_after,
                'args': {k: v for k, v in vars(args).items() if k not in ('child', 'model_dir', 'out', 'steps_file')},
                'steps': meta, 'summary': summary, 'results': results, 'table': lines}
        with open(args.json + '.tmp', 'w') as f:
            json.dump(blob, f, indent=1)
        os.replace(args.json + '.tmp', args.json)
    return 0 if all('error' not in r for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
