"""Chat data -> masked binary shards + meta.json + an audit report.

    python prepare_sft.py --input data.jsonl [more files or globs] --out_dir data/my_sft \\
        --val_fraction 0.05 --max_length 2048 [--format auto] [--num_proc N] [--show 3]

Input: JSONL or a JSON array; each record, auto-detected (or forced with --format):
  messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
  sharegpt           {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
  alpaca             {"instruction": "...", "input": "...", "output": "..."}  (+ optional "system")
  prompt_completion  {"prompt": "...", "completion": "..."}  (either side may be a messages list)
  gsm8k              {"question": "...", "answer": "... #### 42"}
Messages may carry `train: true/false` (assistant turns only; overrides --train_on),
`reasoning_content`, `tool_calls`; role `tool` holds tool results. A record-level "tools" list of
schemas (or a JSON string of one) is kept on the first message and rendered where the chat format
puts tools; ShareGPT turns may carry axolotl's "weight": 0/1.

Tokenizer and chat format: --tokenizer qwen3 (default, built in) or a local Hugging Face directory
(its tokenizer.json, special tokens and chat template); --chat_template auto (default: chatml for
qwen3, else the built-in format the directory's template matches, else its own template through
the general path) or chatml | qwen3 | qwen2.5 | llama3 | mistral | hf. See chat_families.py and
chat_format.py for the exact rendering and masking of each.
A bad record stops the run with `file:line: what is wrong` (or is skipped and counted with
--skip_invalid).

Output in --out_dir (the shard format of sft_data.py: ShardWriter writes it, ShardDataset reads it):
  train.bin / val.bin     tokens, uint32 (uint16 when the vocabulary fits), all examples back to back
  train.mask / val.mask   uint8, 1 = trained token (assistant content and its end-of-turn token)
  train.idx / val.idx     int64 offsets, n+1 entries: example i is [idx[i], idx[i+1])
  meta.json               format_version, tokenizer (name, hash, vocab size, special ids, and
                          chat_format: the format's name, end-of-turn and stop ids, template hash;
                          the template itself for 'hf'), settings, counts and the audit stats
Every file is written under a temporary name and renamed when all are complete (meta.json last),
so a failed or killed run leaves no half-written shard.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing as mp
import os
import sys

import numpy as np

from chat_records import FORMATS, DataError, iter_records
from progress import Progress
from sft_data import ShardWriter
from chat_format import FORMATS as CHAT_FORMATS, get_format, resolve_format
from tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------------
# Encoding (runs in worker processes with --num_proc > 1)

_WORKER: dict = {}


def _init_worker(tokenizer_name: str, train_on: str, chat_format: str, template: str | None,
                 max_length: int, truncation: str):
    tok = load_tokenizer(tokenizer_name)
    _WORKER.update(fmt=get_format(chat_format, tok, template), train_on=train_on,
                   max_length=max_length, truncation=truncation)


def _encode_one(record):
    """(where, messages) -> (ids uint32 array | None, mask uint8 array | None, info dict)."""
    w = _WORKER
    fmt = w['fmt']
    try:
        ids, labels = fmt.encode(record[1], w['train_on'])
    except ValueError as e:   # a record the format cannot render (e.g. a refusal of the general path)
        return None, None, {'error': f'{record[0]}: {e}', 'turns': 0}
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(labels, dtype=np.int64) != -100
    end_turns = int(np.count_nonzero(mask & (ids == fmt.end_id)))
    info = {'length': len(ids), 'turns': end_turns, 'truncated': False, 'drop': None}
    if len(ids) > w['max_length']:
        if w['truncation'] == 'drop':
            info['drop'] = f'longer than max_length={w["max_length"]}'
            return None, None, info
        ids, mask = ids[:w['max_length']], mask[:w['max_length']]
        info['truncated'] = True
    if not mask.any():
        info['drop'] = 'no trained token after truncation' if info['truncated'] else 'no trained token'
        return None, None, info
    info['turns_closed'] = int(np.count_nonzero(mask & (ids == fmt.end_id)))
    return ids, mask.astype(np.uint8), info


def _encode_chunk(chunk):
    return [_encode_one(m) for m in chunk]


def _split_of(msgs, val_fraction: float) -> str:
    # content hash: stable across runs, machines and file order; duplicates land together
    h = hashlib.sha256(json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode()).digest()
    return 'val' if int.from_bytes(h[:8], 'big') / 2.0**64 < val_fraction else 'train'


# ----------------------------------------------------------------------------------------------
# The CLI

def _expand_inputs(patterns) -> list[str]:
    files = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in '*?[') else [p]
        if not hits:
            raise DataError(f'{p}: no file matches this pattern')
        for h in hits:
            if not os.path.isfile(h):
                raise DataError(f'{h}: no such file')
            files.append(h)
    return files


def _percentile(lengths, q):
    return int(np.percentile(lengths, q)) if len(lengths) else 0


def highlight(tok, ids, mask, colour: bool) -> str:
    """The example as text with trained spans in green (terminal) or [brackets]."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            text = tok.decode(ids[start:k])
            if mask[start]:
                text = f'\033[32m{text}\033[0m' if colour else f'[{text}]'
            out.append(text)
            start = k
    return ''.join(out)


def format_audit(stats: dict) -> str:
    rows = [('examples read', stats['read'])]
    if stats['invalid']:
        rows.append(('invalid records skipped', stats['invalid']))
    rows += [('examples kept', f"{stats['kept']} (train {stats['splits']['train']['examples']}, "
                               f"val {stats['splits']['val']['examples']})"),
             ('truncated (kept)', stats['truncated'])]
    for reason, c in sorted(stats['dropped'].items()):
        rows.append((f'dropped: {reason}', c))
    share = stats['trained_tokens'] / max(stats['tokens'], 1)
    rows += [('tokens', stats['tokens']),
             ('trained tokens', f"{stats['trained_tokens']} ({100 * share:.1f}%)"),
             ('length p50/p90/p99/max', '/'.join(str(stats['length'][k]) for k in ('p50', 'p90', 'p99', 'max'))),
             (f"assistant turns ending in {stats['end_of_turn']}", f"{stats['turns_closed']} / {stats['turns']}")]
    w = max(len(r[0]) for r in rows)
    return '\n'.join(f'  {k:<{w}}  {v}' for k, v in rows)


def prepare(args) -> dict:
    if not 0.0 <= args.val_fraction < 1.0:
        raise DataError(f'--val_fraction must be in [0, 1), got {args.val_fraction}')
    if args.max_length < 2:
        raise DataError(f'--max_length must be >= 2, got {args.max_length}')
    files = _expand_inputs(args.input)
    try:
        tok = load_tokenizer(args.tokenizer)
        fmt = resolve_format(tok, args.chat_template, verbose=True)
    except ValueError as e:
        raise DataError(str(e)) from None
    problems: list[str] = []
    records = []
    for path in files:
        records += list(iter_records(path, args.format, args.skip_invalid, problems))
    if not records:
        raise DataError(f'{", ".join(files)}: no valid records')

    dtype = np.uint32 if tok.vocab_size > 65535 else np.uint16
    stats = {'read': len(records) + len(problems), 'invalid': len(problems), 'kept': 0,
             'truncated': 0, 'dropped': {}, 'tokens': 0, 'trained_tokens': 0, 'turns': 0,
             'turns_closed': 0, 'end_of_turn': tok.decode([fmt.end_id])}
    splits = {s: {'examples': 0, 'tokens': 0, 'trained_tokens': 0} for s in ('train', 'val')}
    lengths, shown = [], []
    init = (args.tokenizer, args.train_on, fmt.name, fmt.template if fmt.name == 'hf' else None,
            args.max_length, args.truncation)
    chunk = 256
    chunks = [records[i:i + chunk] for i in range(0, len(records), chunk)]
    with ShardWriter(args.out_dir, dtype) as writer:
        if args.num_proc > 1:
            pool = mp.get_context('spawn' if sys.platform == 'darwin' else 'fork').Pool(
                args.num_proc, initializer=_init_worker, initargs=init)
            results = pool.imap(_encode_chunk, chunks)  # imap keeps the input order
        else:
            pool = None
            _init_worker(*init)
            results = map(_encode_chunk, chunks)
        bar = Progress(len(records), 'encoding', 'ex', out=sys.stderr)
        try:
            for chunk_msgs, chunk_out in zip(chunks, results):
                for (_, msgs), (ids, mask, info) in zip(chunk_msgs, chunk_out):
                    if 'error' in info:
                        if not args.skip_invalid:
                            raise DataError(info['error'])
                        problems.append(info['error'])
                        stats['invalid'] += 1
                        continue
                    stats['turns'] += info['turns']
                    if ids is None:
                        stats['dropped'][info['drop']] = stats['dropped'].get(info['drop'], 0) + 1
                        continue
                    split = _split_of(msgs, args.val_fraction)
                    writer.add(split, ids, mask)
                    sp = splits[split]
                    sp['examples'] += 1
                    sp['tokens'] += len(ids)
                    sp['trained_tokens'] += int(mask.sum())
                    stats['kept'] += 1
                    stats['truncated'] += info['truncated']
                    stats['turns_closed'] += info['turns_closed']
                    lengths.append(len(ids))
                    if len(shown) < args.show:
                        shown.append((ids, mask))
                bar.update(len(chunk_msgs))
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        stats['tokens'] = sum(sp['tokens'] for sp in splits.values())
        stats['trained_tokens'] = sum(sp['trained_tokens'] for sp in splits.values())
        stats['splits'] = splits
        stats['length'] = {'p50': _percentile(lengths, 50), 'p90': _percentile(lengths, 90),
                           'p99': _percentile(lengths, 99), 'max': max(lengths, default=0)}
        stats['problems'] = problems[:100]
        if stats['kept'] == 0:
            raise DataError(f'no example kept (dropped: {stats["dropped"]}); nothing written')
        meta = writer.commit({
            'tokenizer': dict(tok.meta(), chat_format=fmt.meta()), 'chat_template': fmt.name,
            'train_on': args.train_on, 'max_length': args.max_length,
            'truncation': args.truncation, 'val_fraction': args.val_fraction,
            'inputs': files, 'counts': {s: splits[s]['examples'] for s in splits},
            'splits': splits, 'stats': stats})
    for p in problems[:20]:
        print(f'skipped {p}', file=sys.stderr)
    if len(problems) > 20:
        print(f'... and {len(problems) - 20} more skipped records (first 100 in meta.json)', file=sys.stderr)
    print(f'prepare_sft: wrote {args.out_dir}\n' + format_audit(stats))
    colour = sys.stdout.isatty()
    for k, (ids, mask) in enumerate(shown):
        print(f'--- example {k} ({len(ids)} tokens, trained highlighted) ---')
        print(highlight(tok, ids, mask, colour))
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--input', nargs='+', required=True, help='JSONL / JSON files or globs')
    p.add_argument('--out_dir', required=True)
    p.add_argument('--val_fraction', type=float, default=0.05)
    p.add_argument('--max_length', type=int, default=2048)
    p.add_argument('--format', default='auto', choices=FORMATS)
    p.add_argument('--tokenizer', default='qwen3',
                   help="'qwen3' (built in) or a local Hugging Face model/tokenizer directory")
    p.add_argument('--chat_template', default='auto', choices=('auto',) + CHAT_FORMATS,
                   help="auto: chosen from the tokenizer (see chat_format.py); 'hf': the "
                        "directory's own template through the general path")
    p.add_argument('--train_on', default='all', choices=('all', 'last'),
                   help='train on every assistant turn or only the last one')
    p.add_argument('--truncation', default='truncate', choices=('truncate', 'drop'))
    p.add_argument('--num_proc', type=int, default=1)
    p.add_argument('--skip_invalid', action='store_true', help='skip and count bad records')
    p.add_argument('--show', type=int, default=0, help='print K examples with trained tokens marked')
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return prepare(args)
    except DataError as e:
        raise SystemExit(f'prepare_sft: {e}') from None


if __name__ == '__main__':
    main()
