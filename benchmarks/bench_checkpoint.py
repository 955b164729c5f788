"""Checkpoint save and resume under FSDP on 2 gloo CPU ranks: one gathered file vs sharded (DCP).

    .venv/bin/python benchmarks/bench_checkpoint.py [--repeats 3] [--n_layer 8 --n_embd 768 ...] [--json out.json]

Each (format, repeat) is two fresh `torchrun --nproc_per_node=2` jobs. `save` builds the model, shards
it (FSDP2, train_sft.parallelize), takes one AdamW step so the optimizer state is full, then times
the save exactly as the loop calls it (checkpoint.save_training_state, checkpoint_format 'file' or
'sharded'). `resume` times train_sft's resume path (build_model + parallelize: read the checkpoint,
shard, AdamW, restore the training state) from that checkpoint. Per rank: wall and CPU seconds
(user + sys, all threads) of the operation, the RSS before it and its peak RSS (VmHWM, reset just
before it through /proc/self/clear_refs). The formats alternate in order from repeat to repeat;
the table shows medians. A checksum of every rank's parameter shard after resume must equal the
one at save time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_KEYS = ('n_layer', 'n_embd', 'n_head', 'n_kv_head', 'head_dim', 'intermediate_size', 'vocab_size')


def _status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'no {field} in /proc/self/status')


def measure(fn) -> tuple[object, dict]:
    """Run fn once: its wall and CPU seconds, the RSS before it and the peak RSS while it ran (MiB)."""
    import gc
    import resource
    gc.collect()
    rss0 = _status_kib('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:   # VmHWM := current RSS, so the peak is fn's own
        f.write('5')
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return out, {'wall_s': wall, 'cpu_s': cpu, 'rss_before_mib': rss0 / 1024,
                 'peak_rss_mib': _status_kib('VmHWM') / 1024}


def checksum(model) -> float:
    return float(sum(p.detach().to_local().double().sum() if hasattr(p, 'to_local') else p.detach().double().sum()
                     for p in model.parameters()))


def worker(args) -> None:
    """One rank of a `save` or `resume` job; writes report.<rank>.json into args.out."""
    sys.path.insert(0, REPO)
    import torch
    import torch.distributed as dist

    import train_sft
    from checkpoint import save_training_state
    arch = {k: getattr(args, k) for k in MODEL_KEYS}
    cfg = train_sft.TrainConfig(out_dir=args.out, init_from='scratch' if args.worker == 'save' else 'resume',
                                model_preset='tiny', block_size=256, parallel='fsdp', device='cpu',
                                dtype='float32', checkpoint_format=args.format, **arch)
    rt = train_sft.setup_runtime(cfg)
    torch.manual_seed(0)
    report = {'rank': rt.rank}
    if args.worker == 'save':
        model, *_ = train_sft.build_model(cfg, rt.device)
        model, raw, opt, *_ = train_sft.parallelize(cfg, rt, model, None, None, rt.world)
        ids = torch.randint(0, args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(rt.rank))
        _, loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        report['params'] = sum(p.numel() for p in raw.parameters())   # a DTensor's numel is the global one
        dist.barrier()
        _, report['op'] = measure(lambda: save_training_state(
            args.out, raw, opt, iter_num=1, best_val_loss=1.0, step_file=True, fsdp=True,
            sharded=args.format == 'sharded', extra={'config': dataclasses.asdict(cfg)}))
    else:
        dist.barrier()
        (model, raw, *_), report['op'] = measure(
            lambda: train_sft.parallelize(cfg, rt, *train_sft.build_model(cfg, rt.device)[:2], None, rt.world))
    report['checksum'] = checksum(raw)
    with open(os.path.join(args.out, f'report.{rt.rank}.json'), 'w') as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def run_job(args, op: str, fmt: str, out: str) -> list[dict]:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.abspath(__file__), '--worker', op, '--format', fmt, '--out', out,
           *[f'--{k}={getattr(args, k)}' for k in MODEL_KEYS]]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f'{op} {fmt} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    reports = []
    for r in (0, 1):
        path = os.path.join(out, f'report.{r}.json')
        with open(path) as f:
            reports.append(json.load(f))
        os.remove(path)
    return reports


def disk_mib(folder: str) -> float:
    """Bytes on disk under folder: every file once (ckpt.pt is a hard link or a symlink)."""
    seen = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            seen[(st.st_dev, st.st_ino)] = st.st_size if not os.path.islink(os.path.join(root, name)) else 0
    return sum(seen.values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--n_layer', type=int, default=8)
    p.add_argument('--n_embd', type=int, default=768)
    p.add_argument('--n_head', type=int, default=12)
    p.add_argument('--n_kv_head', type=int, default=4)
    p.add_argument('--head_dim', type=int, default=64)
    p.add_argument('--intermediate_size', type=int, default=2048)
    p.add_argument('--vocab_size', type=int, default=32000)
    p.add_argument('--dir', default=None, help='where the checkpoints go (default: a temporary directory)')
    p.add_argument('--json', default=None, help='write every measurement here')
    p.add_argument('--worker', choices=('save', 'resume'), help=argparse.SUPPRESS)
    p.add_argument('--format', choices=('file', 'sharded'), help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    base = tempfile.mkdtemp(prefix='bench_ckpt.', dir=args.dir)
    runs = []
    try:
        for rep in range(args.repeats):
            for fmt in (('file', 'sharded') if rep % 2 == 0 else ('sharded', 'file')):
                out = os.path.join(base, f'{fmt}{rep}')
                save = run_job(args, 'save', fmt, out)
                size = disk_mib(out)
                resume = run_job(args, 'resume', fmt, out)
                if [r['checksum'] for r in save] != [r['checksum'] for r in resume]:
                    raise SystemExit(f'{fmt}: the resumed parameters differ from the saved ones')
                runs.append({'format': fmt, 'repeat': rep, 'disk_mib': size, 'params': save[0]['params'],
                             'save': [r['op'] for r in save], 'resume': [r['op'] for r in resume]})
                print(f"repeat {rep} {fmt:7s}: save {save[0]['op']['wall_s']:.2f} s, resume "
                      f"{resume[0]['op']['wall_s']:.2f} s (rank 0 wall)", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    params = runs[0]['params']
    print(f"\nmodel: {params / 1e6:.1f}M parameters, fp32: {params * 4 / 2**20:.0f} MiB of weights + "
          f"{params * 8 / 2**20:.0f} MiB of AdamW state; 2 gloo ranks (FSDP2), {args.repeats} repeats, medians")
    print('| format | op | rank 0 wall s | rank 0 CPU s | rank 0 peak RSS MiB (before) | rank 1 peak RSS MiB (before) | on disk MiB |')
    print('|---|---|---:|---:|---:|---:|---:|')
    for fmt in ('file', 'sharded'):
        mine = [r for r in runs if r['format'] == fmt]
        for op in ('save', 'resume'):
            def med(rank, key):
                return statistics.median(r[op][rank][key] for r in mine)
            print(f"| {fmt} | {op} | {med(0, 'wall_s'):.2f} | {med(0, 'cpu_s'):.2f} | "
                  f"{med(0, 'peak_rss_mib'):,.0f} ({med(0, 'rss_before_mib'):,.0f}) | "
                  f"{med(1, 'peak_rss_mib'):,.0f} ({med(1, 'rss_before_mib'):,.0f}) | "
                  f"{statistics.median(r['disk_mib'] for r in mine):,.0f} |")
    if args.json:
        import torch
        with open(args.json, 'w') as f:
            json.dump({'machine': platform.platform(), 'python': platform.python_version(),
                       'torch': torch.__version__, 'cpus': os.cpu_count(), 'args': vars(args), 'runs': runs}, f, indent=1)


if __name__ == '__main__':
    main()
