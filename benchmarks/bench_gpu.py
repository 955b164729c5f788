"""GPU throughput of nanoSFT's training step: tokens/s, MFU, peak memory, the largest batch that fits.

    python benchmarks/bench_gpu.py                        # qwen3-0.6b and qwen3-1.7b, bf16, compile
    python benchmarks/bench_gpu.py --presets qwen3-1.7b --batch_sizes 1,2,4,8,16 --json out.json
    python benchmarks/bench_gpu.py --presets qwen3-1.7b --block_size 16384 --batch_sizes 1 \\
        --activation_checkpointing full               # does 16k fit one 80 GB GPU with AC?
    python benchmarks/bench_gpu.py --device cpu --presets tiny --block_size 256 --dtype float32 \\
        --no_compile --batch_sizes 1,2 --steps 2      # the CPU smoke test CI runs

The step is train_sft's: random weights with the preset's architecture (throughput does not depend on
the values), GSM8K conversations as chat packed at block_size with document masking
(train_sft.SFTDataset(packing=True)), train_sft.forward_backward under bf16 autocast with fp32 master
weights, gradient clipping, AdamW from configure_optimizers (fused on CUDA). Each (preset, batch size)
runs in its own subprocess, so an out-of-memory error ends that batch-size search cleanly and one
run's compile caches and allocator state do not leak into the next.

Packed rows take the document-masked attention path (--attention auto: flash varlen_attn on CUDA in
bf16, no mask); --activation_checkpointing recomputes blocks in backward. Each run also prints the
memory planner's prediction for itself (memory_plan.py) next to the measured peak.

MFU = model FLOPs per second / the GPU's peak (H100 SXM dense bf16: 989 TFLOP/s; --peak_tflops).
Model FLOPs per token follow PaLM / nanoGPT / nanochat: ModelArchitectureConfig.flops_per_token
(6 x every matmul weight incl. the LM head, + 12 L H d T attention). nanoSFT runs the LM head only on
trained tokens, so it does less work than that count says; `hw_util` reports the FLOPs actually
computed (head on trained tokens only) against the same peak.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--presets', default='qwen3-0.6b,qwen3-1.7b')
    p.add_argument('--block_size', type=int, default=2048)
    p.add_argument('--batch_sizes', default='1,2,4,8,16,32',
                   help='packed rows per step, tried in order until one does not fit')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps (compilation happens here)')
    p.add_argument('--steps', type=int, default=10, help='timed steps')
    p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
    p.add_argument('--no_compile', action='store_true')
    p.add_argument('--attention', default='auto', help="packed rows' path: auto (flash varlen on CUDA "
                   "bf16) | varlen | per_doc | dense (the O(T^2) mask, for comparison)")
    p.add_argument('--activation_checkpointing', default='none', choices=('none', 'full', 'selective'))
    p.add_argument('--ac_every', type=int, default=2, help="'selective': checkpoint every k-th block")
    p.add_argument('--device', default='cuda')
    p.add_argument('--peak_tflops', type=float, default=None,
                   help='per-GPU peak for MFU (default: guessed from the GPU name; none on CPU)')
    p.add_argument('--data', default=common.GSM8K)
    p.add_argument('--json', default=None, help='write all results here')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--batch_size', type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(args) -> dict:
    """One preset at one batch size: build, warm up, time. -> result dict (or {'oom': True})."""
    common.ensure_repo_on_path()
    import torch
    from model_builder import ConfigurableGPT
    from model_config import ModelArchitectureConfig
    import memory_plan
    from attention import resolve
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    from train_sft import SFTDataset, forward_backward, guess_peak_flops
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelArchitectureConfig.from_preset(args.child, block_size=args.block_size)
    tok = load_tokenizer('qwen3')
    n_steps = args.warmup + args.steps
    rows = args.batch_size * n_steps
    # ~200 tokens per GSM8K conversation: enough conversations to fill every step's packed rows
    convs = common.gsm8k_conversations(args.data, max(64, rows * args.block_size // 120))
    seqs = [tuple(x[:args.block_size] for x in encode_conversation(c, tok)) for c in convs]
    ds = SFTDataset(seqs, args.block_size, packing=True, pad_id=tok.pad_id, shuffle=False)
    units = ds.units(0)
    if len(units) < rows:
        raise SystemExit(f'{args.data}: only {len(units)} packed rows of {args.block_size} tokens, '
                         f'{rows} needed')
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')
    try:
        model = ConfigurableGPT(cfg).to(device)
        model.config.attention = args.attention
        model.set_activation_checkpointing(args.activation_checkpointing, args.ac_every)
        model.train()
        opt = model.configure_optimizers(0.1, 1e-5, (0.9, 0.95), device.type)
        step_model = model if args.no_compile else torch.compile(model)
        times, tokens, trained = [], 0, 0
        for step in range(n_steps):
            batch = ds.collate(units[step * args.batch_size:(step + 1) * args.batch_size])
            if device.type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, n_trained, n_tokens = forward_backward(step_model, [batch], device, autocast=autocast)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                tokens += int(n_tokens)
                trained += int(n_trained)
    except torch.OutOfMemoryError:
        return {'preset': args.child, 'batch_size': args.batch_size, 'oom': True}
    seconds = sum(times)
    T = args.block_size
    flops_tok = cfg.flops_per_token(T)
    head_flops = 6 * cfg.vocab_size * cfg.n_embd
    model_flops = flops_tok * tokens
    done_flops = (flops_tok - head_flops) * tokens + head_flops * trained
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else guess_peak_flops(device.type, args.dtype)) or None
    res = {'preset': args.child, 'batch_size': args.batch_size, 'block_size': T,
           'params': cfg.num_params(non_embedding=False), 'step_s': seconds / len(times),
           'tok_s': tokens / seconds, 'trained_tok_s': trained / seconds,
           'trained_share': trained / tokens, 'model_tflops': model_flops / seconds / 1e12,
           'mfu': model_flops / seconds / peak if peak else None,
           'hw_util': done_flops / seconds / peak if peak else None,
           'peak_mem_bytes': (torch.cuda.max_memory_allocated() if device.type == 'cuda'
                              else common.peak_rss_bytes()),
           'dtype': args.dtype, 'compile': not args.no_compile, 'device': str(device),
           'attention': resolve(args.attention, device.type, getattr(torch, args.dtype))[0],
           'activation_checkpointing': args.activation_checkpointing,
           # the planner's prediction for this very run, to check it on a GPU
           'planned_peak_bytes': memory_plan.plan(
               cfg, memory_plan.Setup(ac=args.activation_checkpointing, ac_every=args.ac_every),
               tokens=args.batch_size * T, trained_tokens=trained // len(times), dtype=args.dtype,
               device=device.type).peak}
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        res = run_child(args)
        with open(args.out, 'w') as f:
            json.dump(res, f)
        return 0
    if not os.path.exists(args.data):
        raise SystemExit(f'bench_gpu: GSM8K not found at {args.data} (pass --data)')
    results, t_start = [], time.time()
    passthrough = ['--block_size', str(args.block_size), '--warmup', str(args.warmup), '--steps',
                   str(args.steps), '--dtype', args.dtype, '--device', args.device, '--data', args.data]
    passthrough += ['--no_compile'] if args.no_compile else []
    passthrough += ['--attention', args.attention, '--activation_checkpointing', args.activation_checkpointing,
                    '--ac_every', str(args.ac_every)]
    passthrough += ['--peak_tflops', str(args.peak_tflops)] if args.peak_tflops else []
    rc = 0
    for preset in args.presets.split(','):
        for bs in [int(b) for b in args.batch_sizes.split(',')]:
            with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as f:
                out = f.name
            t0 = time.time()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', preset,
                                   '--batch_size', str(bs), '--out', out, *passthrough],
                                  capture_output=True, text=True)
            try:
                if proc.returncode != 0:
                    results.append({'preset': preset, 'batch_size': bs,
                                    'error': proc.stderr.strip().splitlines()[-1:] or ['?']})
                    print(f'{preset} batch {bs}: failed\n{proc.stderr[-2000:]}', file=sys.stderr)
                    rc = 1
                    break
                with open(out) as f:
                    res = json.load(f)
            finally:
                os.remove(out)
            results.append(res)
            print(f'{preset} batch {bs}: ' + ('out of memory' if res.get('oom') else
                  f"{res['tok_s']:,.0f} tok/s ({time.time() - t0:.0f} s)"), file=sys.stderr)
            if res.get('oom'):
                break
    print_table(results, args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': common.machine_description(), 'commit': common.git_commit(),
                       'args': vars(args), 'results': results,
                       'wall_s': time.time() - t_start}, f, indent=1)
    return rc


def print_table(results, args):
    pct = lambda v: '-' if v is None else f'{100 * v:.1f}%'
    print(f'\n{common.machine_description()}; block_size {args.block_size}, {args.dtype}, '
          f"compile {'off' if args.no_compile else 'on'}, packing with document masks, GSM8K, attention "
          f"{args.attention}, activation checkpointing {args.activation_checkpointing}")
    print('| preset | rows/step | tokens/s | trained tok/s | model TFLOP/s | MFU | hw util | peak mem | planned |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in results:
        if 'tok_s' not in r:
            print(f"| {r['preset']} | {r['batch_size']} | {'out of memory' if r.get('oom') else 'error'} |"
                  ' | | | | |')
            continue
        print(f"| {r['preset']} | {r['batch_size']} | {r['tok_s']:,.0f} | {r['trained_tok_s']:,.0f} | "
              f"{r['model_tflops']:.1f} | {pct(r['mfu'])} | {pct(r['hw_util'])} | "
              f"{r['peak_mem_bytes'] / 2 ** 30:.1f} GiB | {r['planned_peak_bytes'] / 2 ** 30:.1f} GiB |")
    for preset in dict.fromkeys(r['preset'] for r in results):
        rows = [r for r in results if r['preset'] == preset]
        fit = [r['batch_size'] for r in rows if 'tok_s' in r]
        bound = '' if any(r.get('oom') for r in rows) else ' (the largest tried; no OOM reached)'
        print(f"{preset}: largest batch that fits: {max(fit) if fit else 'none'} rows of "
              f"{args.block_size} tokens{bound}")


if __name__ == '__main__':
    sys.exit(main())
