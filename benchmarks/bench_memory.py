"""The memory planner (memory_plan.py) against measured peaks of real training steps on CPU.

    python benchmarks/bench_memory.py [--json out.json] [--cases 2x128@1024,...]

Each case runs in its own process: GSM8K conversations packed with document masking
(train_sft.SFTDataset), train_sft.forward_backward + clip + AdamW (configure_optimizers) in fp32,
2 warm-up steps (so AdamW's state exists), then one step measured two ways:
  live tensors  torch's MemTracker (torch.distributed._tools.mem_tracker: a dispatch mode that
                follows every tensor storage the step creates and frees, plus the parameters,
                gradients and optimizer state) -> the peak of the bytes alive at once. It counts
                what the planner counts, with no Python, library or allocator overhead.
  RSS growth    ru_maxrss of the process at the end of the warm-up steps minus the RSS just before
                the model was built (after imports, data, and the same steps on a tiny model of the
                same family, so the kernels' code pages and thread pools are already in): the
                training-time increase the OS sees, allocator slack included. The children run with
                MALLOC_MMAP_THRESHOLD_=65536: glibc's default raises the threshold after big frees
                and then keeps freed buffers of up to 32 MiB (+350 MiB at 6x512, 2 x 2048, measured).
The planner gets the same architecture, tokens per step, trained tokens, dtype (fp32) and device
and nothing measured. Goal: within 15% of the measured peaks.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py)

# shape@block[xrows][:ac[/every]][:vocab]
DEFAULT_CASES = ('2x128@1024', '6x512@2048', '6x512@4096:full', '12x768@1024:selective/2',
                 '6x512@2048x2:none:32000', '12x768@2048:full:32000')


def parse_case(case: str) -> dict:
    parts = case.split(':')
    shape, _, rest = parts[0].partition('@')
    block, _, rows = rest.partition('x')
    ac, _, every = (parts[1] if len(parts) > 1 else 'none').partition('/')
    return {'case': case, 'shape': shape, 'block': int(block), 'rows': int(rows or 1), 'ac': ac,
            'every': int(every or 2), 'vocab': int(parts[2]) if len(parts) > 2 else 151936}


def architecture(c: dict):
    from model_config import ModelArchitectureConfig
    L, C, H, KV, F = common.shape(c['shape'])
    return ModelArchitectureConfig.from_preset('tiny', n_layer=L, n_embd=C, n_head=H, n_kv_head=KV,
                                               head_dim=64, intermediate_size=F, vocab_size=c['vocab'],
                                               block_size=c['block'])


def child(c: dict, data: str, threads: int) -> dict:
    """One case: build, warm up, measure one step (see the module docstring)."""
    common.ensure_repo_on_path()
    import torch
    torch.set_num_threads(threads)
    from torch.distributed._tools.mem_tracker import MemTracker

    import memory_plan
    from model_builder import ConfigurableGPT
    from model_config import ModelArchitectureConfig
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    from train_sft import SFTDataset, forward_backward
    tok = load_tokenizer('qwen3')
    B, T = c['rows'], c['block']
    convs = common.gsm8k_conversations(data, 4 * B * T // 150 + 16)
    seqs = [encode_conversation(m, tok) for m in convs]
    if c['vocab'] < 151936:   # a smaller vocabulary: fold the ids into it (memory does not care)
        seqs = [([i % c['vocab'] for i in ids], [x if x < 0 else x % c['vocab'] for x in lab])
                for ids, lab in seqs]
    ds = SFTDataset(seqs, T, packing=True, pad_id=0, shuffle=False)
    units = ds.units(0)
    batches = [ds.collate(units[s * B:(s + 1) * B]) for s in range(3)]

    def build(arch):
        model = ConfigurableGPT(arch)
        model.set_activation_checkpointing(c['ac'], c['every'])
        return model.train(), model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 'cpu')

    def step(model, opt, batch):
        stats = forward_backward(model, [batch], 'cpu')
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return stats

    # The same kernels once on a tiny model of the same family, so the baseline already holds the
    # code pages and thread pools they bring in: the growth below is the training's own memory.
    tiny = dict(architecture(c).to_dict(), n_layer=1, n_embd=128, n_head=2, n_kv_head=1, vocab_size=2048)
    m, o = build(ModelArchitectureConfig.from_dict(tiny))
    for b in batches[:2]:
        step(m, o, dict(b, input_ids=b['input_ids'] % 2048, labels=b['labels'].where(b['labels'] < 0, b['labels'] % 2048)))
    del m, o
    gc.collect()
    torch.manual_seed(0)
    rss_base = common.rss_bytes()
    arch = architecture(c)
    model, opt = build(arch)
    t0 = time.process_time()
    for b in batches[:2]:
        step(model, opt, b)
    cpu_s = (time.process_time() - t0) / 2
    rss_growth = common.peak_rss_bytes() - rss_base
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        stats = step(model, opt, batches[2])
    snap = tracker.get_tracker_snapshot('peak')
    by_kind = {str(getattr(k, 'value', k)): v for d in snap.values() for k, v in d.items()}
    live_peak = max(d['Total'] for d in snap.values())
    trained = int(stats[1])
    p = memory_plan.plan(arch, memory_plan.Setup(ac=c['ac'], ac_every=c['every']), tokens=B * T,
                         trained_tokens=trained, dtype='float32', device='cpu')
    return {**c, 'params': arch.num_params(non_embedding=False), 'tokens': B * T, 'trained': trained,
            'cpu_s_per_step': cpu_s, 'live_peak': live_peak, 'live_by_kind': by_kind,
            'rss_growth': rss_growth, 'planned_peak': p.peak, 'planned_phases': p.phases,
            'planned': {'weights': p.weights, 'gradients': p.gradients, 'optimizer': p.optimizer,
                        'activations': p.activations, 'loss': p.loss}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--cases', default=','.join(DEFAULT_CASES),
                    help='comma list of shape@block[xrows][:ac[/every]][:vocab], shapes ' + ', '.join(common.SHAPES))
    ap.add_argument('--data', default=common.GSM8K)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--json', default=None)
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--out', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = child(parse_case(args.child), args.data, args.threads)
        with open(args.out, 'w') as f:
            json.dump(res, f)
        return 0
    if not os.path.exists(args.data):
        raise SystemExit(f'--data: {args.data} not found (GSM8K train.jsonl)')
    # glibc's malloc raises its mmap threshold after each big free, then keeps later freed buffers
    # up to 32 MiB in its heap: a fixed threshold returns them, so RSS follows the live memory.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               MALLOC_MMAP_THRESHOLD_=os.environ.get('MALLOC_MMAP_THRESHOLD_', '65536'))
    results, t_start = [], time.time()
    for case in args.cases.split(','):
        with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as f:
            out = f.name
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', case, '--out', out,
                               '--data', args.data, '--threads', str(args.threads)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f'{case}: FAILED\n{proc.stderr[-3000:]}', file=sys.stderr)
            return 1
        with open(out) as f:
            results.append(json.load(f))
        os.remove(out)
        print(f'{case}: done', file=sys.stderr)
    lines = table(results)
    print('\n'.join(lines))
    print(f'total wall time {time.time() - t_start:.0f} s; {common.machine_description()}')
    if args.json:
        with open(args.json + '.tmp', 'w') as f:
            json.dump({'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'commit': common.git_commit(),
                       'machine': common.machine_description(), 'results': results, 'table': lines}, f, indent=1)
        os.replace(args.json + '.tmp', args.json)
    worst = max(max(abs(r['planned_peak'] / r['live_peak'] - 1), abs(r['planned_peak'] / r['rss_growth'] - 1))
                for r in results)
    return 0 if worst <= 0.15 else 2


def table(results) -> list[str]:
    mib = lambda b: f'{b / 2 ** 20:,.0f}'
    lines = ['| case | params | tokens (trained) | AC | planned peak MiB | live-tensor peak MiB | plan / live | '
             'RSS growth MiB | plan / RSS | planned activations MiB |',
             '|---|---:|---:|---|---:|---:|---:|---:|---:|---:|']
    for r in results:
        ac = r['ac'] + (f"/{r['every']}" if r['ac'] == 'selective' else '')
        lines.append(f"| {r['shape']}, vocab {r['vocab']:,}, {r['rows']} x {r['block']} | {r['params'] / 1e6:.0f}M | "
                     f"{r['tokens']:,} ({r['trained']:,}) | {ac} | {mib(r['planned_peak'])} | {mib(r['live_peak'])} | "
                     f"{r['planned_peak'] / r['live_peak']:.3f} | {mib(r['rss_growth'])} | "
                     f"{r['planned_peak'] / r['rss_growth']:.3f} | {mib(r['planned']['activations'])} |")
    return lines


if __name__ == '__main__':
    sys.exit(main())
