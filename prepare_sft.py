"""Chat data -> masked binary shards + meta.json + an audit report.

    python prepare_sft.py --input data.jsonl [more files or globs] --out_dir data/my_sft \\
        --val_fraction 0.05 --max_length 2048 [--format auto] [--num_proc N] [--show 3]
    python prepare_sft.py --input chat.jsonl:0.7 'math/*.parquet:0.3' --out_dir data/mix --dedup

Input: JSONL, a JSON array, or Parquet / Arrow IPC (.parquet, .arrow: Hugging Face datasets' files;
needs pyarrow). Each record, auto-detected (or forced with --format):
  messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
  sharegpt           {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
  alpaca             {"instruction": "...", "input": "...", "output": "..."}  (+ optional "system")
  prompt_completion  {"prompt": "...", "completion": "..."}  (either side may be a messages list)
  gsm8k              {"question": "...", "answer": "... #### 42"}
Messages may carry `train: true/false` (assistant turns only; overrides --train_on),
`reasoning_content`, `tool_calls`; role `tool` holds tool results. A record-level "tools" list of
schemas (or a JSON string of one) is kept on the first message and rendered where the chat format
puts tools; ShareGPT turns may carry axolotl's "weight": 0/1. chat_records.py reads every format
(the Parquet / Arrow columns too).

Tokenizer and chat format: --tokenizer qwen3 (default, built in) or a local Hugging Face directory
(its tokenizer.json, special tokens and chat template); --chat_template auto (default: chatml for
qwen3, else the built-in format the directory's template matches, else its own template through
the general path) or chatml | qwen3 | qwen2.5 | llama3 | mistral | hf. See chat_families.py and
chat_format.py for the exact rendering and masking of each.
A bad record stops the run with `file:line: what is wrong` (`file:row N:` in Parquet / Arrow), or
is skipped and counted with --skip_invalid.

Sources and mixtures: every --input argument is one source (a glob: all its files). `PATH:WEIGHT`
gives it a sampling weight (the text after the last ':' when it is a number; a file whose own name
ends like that is read as a file). Give every source a weight or none. Training then samples each
source by its weight (sft_data.Mixture: by examples, or by trained tokens with --mix_by tokens or
train_sft.py's mixture_by), upsampling a small source in a new seeded order each pass. Without
weights the sources are simply concatenated. Each example's source is recorded ({split}.src).

--dedup keeps the first of identical conversations (chat_records.conversation_key: NFC, whitespace
stripped at both ends of every string, canonical roles, key order ignored), in --input order.

Everything streams: records are read, encoded (by --num_proc workers, a bounded number of chunks in
flight), split and written one chunk at a time, so memory does not grow with the input (except the
16-byte hashes of --dedup and, for a weighted mixture, 6 bytes per training example for the audit).

Output in --out_dir (the shard format of sft_data.py: ShardWriter writes it, ShardDataset reads it):
  train.bin / val.bin     tokens, uint32 (uint16 when the vocabulary fits), all examples back to back
  train.mask / val.mask   uint8, 1 = trained token (assistant content and its end-of-turn token)
  train.idx / val.idx     int64 offsets, n+1 entries: example i is [idx[i], idx[i+1])
  train.src / val.src     uint16, the source of each example (an index into meta.json's 'sources')
  meta.json               format_version, tokenizer (name, hash, vocab size, special ids, and
                          chat_format: the format's name, end-of-turn and stop ids, template hash;
                          the template itself for 'hf'), settings, sources (files, weight,
                          per-source counts), counts and the audit stats
Every file is written under a temporary name and renamed when all are complete (meta.json last),
so a failed or killed run leaves no half-written shard.
"""
from __future__ import annotations

import argparse
import array
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import unicodedata
from collections import deque
from dataclasses import dataclass

import numpy as np

from chat_records import FORMATS, DataError, check_input, conversation_key, iter_records
from progress import Progress
from chat_format import FORMATS as CHAT_FORMATS, get_format, resolve_format
from sft_data import MIXTURE_BY, SOURCE_DTYPE, Mixture, ShardWriter
from tokenizer import load_tokenizer

CHUNK = 256   # records per task sent to a worker

# ----------------------------------------------------------------------------------------------
# Encoding (runs in worker processes with --num_proc > 1)

_WORKER: dict = {}


def _init_worker(tokenizer_name: str, train_on: str, chat_format: str, template: str | None,
                 max_length: int, truncation: str, val_fraction: float, dedup: bool):
    tok = load_tokenizer(tokenizer_name)
    _WORKER.update(fmt=get_format(chat_format, tok, template), train_on=train_on,
                   max_length=max_length, truncation=truncation, val_fraction=val_fraction, dedup=dedup)


def _encode_one(where, msgs):
    """-> (ids uint32 array | None, mask uint8 array | None, info dict)."""
    w = _WORKER
    fmt = w['fmt']
    try:
        ids, labels = fmt.encode(msgs, w['train_on'])
    except ValueError as e:   # a record the format cannot render (e.g. a refusal of the general path)
        return None, None, {'error': f'{where}: {e}', 'turns': 0}
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
    """[(source, where, messages)] -> [(source, ids, mask, info, split, dedup key or None)]: the
    split hash and the dedup key are computed here too, so the main process only writes."""
    out = []
    for source, where, msgs in chunk:
        key = conversation_key(msgs) if _WORKER['dedup'] else None
        ids, mask, info = _encode_one(where, msgs)
        split = _split_of(msgs, _WORKER['val_fraction']) if ids is not None else None
        out.append((source, ids, mask, info, split, key))
    return out


def _split_of(msgs, val_fraction: float) -> str:
    # content hash: stable across runs, machines and file order; duplicates land together, also
    # those that differ only in Unicode normalization (the tokenizer NFC-normalizes: same ids)
    text = unicodedata.normalize('NFC', json.dumps(msgs, sort_keys=True, ensure_ascii=False))
    h = hashlib.sha256(text.encode()).digest()
    return 'val' if int.from_bytes(h[:8], 'big') / 2.0**64 < val_fraction else 'train'


def _ordered_map(pool, fn, items, window: int):
    """pool.imap, but with at most `window` tasks in flight: imap's feeder would read the whole
    input ahead of the workers, and the input may be larger than memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------
# Sources

@dataclass
class Source:
    name: str                 # the --input argument without its weight
    files: list
    weight: float | None


def parse_sources(specs) -> list[Source]:
    """--input arguments -> sources; every file checked (exists, readable, Parquet / Arrow columns)
    before any work. `PATH:WEIGHT`: see the module docstring."""
    sources, owner = [], {}
    for spec in specs:
        path, weight = spec, None
        head, sep, tail = spec.rpartition(':')
        if sep and head and not os.path.exists(spec):
            try:
                weight = float(tail)
            except ValueError:
                weight = None   # not a number: the ':' is part of the path
            else:
                path = head
                if not math.isfinite(weight) or weight <= 0:
                    raise DataError(f'--input {spec}: the weight {tail!r} must be a positive number')
        files = sorted(glob.glob(path)) if any(c in path for c in '*?[') else [path]
        if not files:
            raise DataError(f'{path}: no file matches this pattern')
        for f in files:
            check_input(f)
            if f in owner:
                raise DataError(f'{f}: in two sources ({owner[f]!r} and {path!r})')
            owner[f] = path
        sources.append(Source(path, files, weight))
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        bare = [s.name for s in sources if s.weight is None]
        raise DataError(f'--input: give every source a weight or none ({", ".join(bare)} has none)')
    if len(sources) > np.iinfo(SOURCE_DTYPE).max:
        raise DataError(f'--input: {len(sources)} sources, at most {np.iinfo(SOURCE_DTYPE).max}')
    return sources


class Problems:
    """The skipped records: a count (per source) and the first `keep` messages (bounded)."""

    def __init__(self, keep: int = 100):
        self.first, self.count, self.source, self.keep = [], 0, 0, keep
        self.per_source: dict[int, int] = {}

    def append(self, msg: str, source: int | None = None):
        source = self.source if source is None else source
        self.count += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        if len(self.first) < self.keep:
            self.first.append(msg)


def _records(sources, fmt, skip_invalid, problems: Problems):
    for k, src in enumerate(sources):
        problems.source = k
        for path in src.files:
            for where, msgs in iter_records(path, fmt, skip_invalid, problems):
                yield k, where, msgs


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------
# The audit

def percentile(hist: np.ndarray, q: float) -> int:
    """int(np.percentile(lengths, q)) from a histogram of the lengths (hist[L] = how many have
    length L): the same order statistics and the same linear interpolation, in bounded memory."""
    n = int(hist.sum())
    if n == 0:
        return 0
    cum = np.cumsum(hist)
    pos = np.true_divide(q, 100) * (n - 1)
    lo = math.floor(pos)
    a, b = (float(np.searchsorted(cum, k, 'right')) for k in (lo, min(lo + 1, n - 1)))
    t = pos - lo
    return int(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)


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


def format_audit(stats: dict, sources: list | None = None) -> str:
    rows = [('examples read', stats['read'])]
    if stats['invalid']:
        rows.append(('invalid records skipped', stats['invalid']))
    if stats.get('duplicates') is not None:
        rows.append(('duplicates removed (--dedup)', stats['duplicates']))
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
    text = '\n'.join(f'  {k:<{w}}  {v}' for k, v in rows)
    if sources and (len(sources) > 1 or sources[0].get('weight') is not None):
        text += '\n' + format_sources(sources, stats.get('mixture_by'))
    return text


def format_sources(sources: list, mixture_by: str | None) -> str:
    """One line per source: examples, tokens, trained share, and the realized proportion (of
    training examples and trained tokens in an epoch: the weighted sampler's epoch 0, or the
    natural shares when the sources are not weighted)."""
    how = (f'weighted, sampled by {mixture_by}; realized = epoch 0 of the training sampler'
           if mixture_by else 'not weighted: each example once per epoch')
    lines = [f'  sources ({how}):']
    width = max(len(s['name']) for s in sources)
    for s in sources:
        ex = s['examples']
        dup = f", {s['duplicates']} duplicates" if s.get('duplicates') else ''
        weight = f"weight {s['weight_share']:.3f}, " if s.get('weight') is not None else ''
        lines.append(f"    {s['name']:<{width}}  {weight}{ex['train'] + ex['val']} examples (train "
                     f"{ex['train']}), {s['tokens']} tokens, {100 * s['trained_share']:.1f}% trained{dup}; "
                     f"realized {100 * s['realized_examples']:.2f}% of examples, "
                     f"{100 * s['realized_trained_tokens']:.2f}% of trained tokens"
                     + (f" ({s['passes']:.2f} passes/epoch)" if s.get('passes') is not None else ''))
    return '\n'.join(lines)


def source_report(sources: list[Source], per: list[dict], mixture_by: str | None,
                  train_src, train_trained) -> list[dict]:
    """meta.json's 'sources': per source its files, weight and counts, plus the realized
    proportion (see format_sources)."""
    total_ex = max(sum(p['examples']['train'] for p in per), 1)
    total_tr = max(sum(p['train_trained_tokens'] for p in per), 1)
    realized = None
    if mixture_by:
        mix = Mixture(np.frombuffer(train_src, dtype=f'u{train_src.itemsize}'), [s.weight for s in sources],
                      mixture_by, np.frombuffer(train_trained, dtype=f'u{train_trained.itemsize}'),
                      names=[s.name for s in sources])
        realized = mix.report(0)
    out = []
    for k, (src, p) in enumerate(zip(sources, per)):
        row = {'name': src.name, 'files': src.files, 'weight': src.weight, **p,
               'trained_share': p['trained_tokens'] / max(p['tokens'], 1)}
        if realized:
            r = realized[k]
            row.update(weight_share=r['weight'], realized_examples=r['example_share'],
                       realized_trained_tokens=r['token_share'], passes=r['passes'])
        else:
            row.update(realized_examples=p['examples']['train'] / total_ex,
                       realized_trained_tokens=p['train_trained_tokens'] / total_tr)
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# The CLI

def prepare(args) -> dict:
    if not 0.0 <= args.val_fraction < 1.0:
        raise DataError(f'--val_fraction must be in [0, 1), got {args.val_fraction}')
    if args.max_length < 2:
        raise DataError(f'--max_length must be >= 2, got {args.max_length}')
    if args.format not in FORMATS:
        raise DataError(f'unknown --format {args.format!r} (expected one of {", ".join(FORMATS)})')
    sources = parse_sources(args.input)
    files = [f for s in sources for f in s.files]
    mixture_by = args.mix_by if sources[0].weight is not None else None
    try:
        tok = load_tokenizer(args.tokenizer)
        fmt = resolve_format(tok, args.chat_template, verbose=True)
    except ValueError as e:
        raise DataError(str(e)) from None

    dtype = np.uint32 if tok.vocab_size > 65535 else np.uint16
    stats = {'read': 0, 'invalid': 0, 'kept': 0, 'truncated': 0, 'dropped': {}, 'tokens': 0,
             'trained_tokens': 0, 'turns': 0, 'turns_closed': 0, 'end_of_turn': tok.decode([fmt.end_id]),
             'duplicates': 0 if args.dedup else None}
    splits = {s: {'examples': 0, 'tokens': 0, 'trained_tokens': 0} for s in ('train', 'val')}
    per = [{'read': 0, 'invalid': 0, 'duplicates': 0, 'dropped': 0, 'truncated': 0,
            'examples': {'train': 0, 'val': 0}, 'tokens': 0, 'trained_tokens': 0,
            'train_trained_tokens': 0} for _ in sources]
    hist = np.zeros(args.max_length + 1, dtype=np.int64)   # kept lengths are <= max_length
    seen: set[bytes] = set()                                # --dedup: 16-byte conversation keys
    train_src, train_trained = array.array('H'), array.array('I')   # weighted mixtures: the audit
    shown = []
    problems = Problems()
    init = (args.tokenizer, args.train_on, fmt.name, fmt.template if fmt.name == 'hf' else None,
            args.max_length, args.truncation, args.val_fraction, args.dedup)
    chunks = _chunks(_records(sources, args.format, args.skip_invalid, problems), CHUNK)
    with ShardWriter(args.out_dir, dtype) as writer:
        if args.num_proc > 1:
            pool = mp.get_context('spawn' if sys.platform == 'darwin' else 'fork').Pool(
                args.num_proc, initializer=_init_worker, initargs=init)
            results = _ordered_map(pool, _encode_chunk, chunks, 4 * args.num_proc)
        else:
            pool = None
            _init_worker(*init)
            results = map(_encode_chunk, chunks)
        bar = Progress(None, 'encoding', 'ex', out=sys.stderr)   # streaming: the total is not known
        try:
            for chunk_out in results:
                for k, ids, mask, info, split, key in chunk_out:
                    src = per[k]
                    if 'error' in info:   # the chat format refused the record
                        if not args.skip_invalid:
                            raise DataError(info['error'])
                        problems.append(info['error'], source=k)
                        continue
                    src['read'] += 1
                    if key is not None:
                        if key in seen:
                            stats['duplicates'] += 1
                            src['duplicates'] += 1
                            continue
                        seen.add(key)
                    stats['turns'] += info['turns']
                    if ids is None:
                        stats['dropped'][info['drop']] = stats['dropped'].get(info['drop'], 0) + 1
                        src['dropped'] += 1
                        continue
                    writer.add(split, ids, mask, k)
                    trained = int(mask.sum())
                    sp = splits[split]
                    sp['examples'] += 1
                    sp['tokens'] += len(ids)
                    sp['trained_tokens'] += trained
                    src['examples'][split] += 1
                    src['tokens'] += len(ids)
                    src['trained_tokens'] += trained
                    if split == 'train':
                        src['train_trained_tokens'] += trained
                        if mixture_by:
                            train_src.append(k)
                            train_trained.append(trained)
                    stats['kept'] += 1
                    stats['truncated'] += info['truncated']
                    src['truncated'] += info['truncated']
                    stats['turns_closed'] += info['turns_closed']
                    hist[len(ids)] += 1
                    if len(shown) < args.show:
                        shown.append((ids, mask))
                bar.update(len(chunk_out))
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        for k, n in problems.per_source.items():
            per[k]['invalid'] = n
            per[k]['read'] += n
        stats['read'] = sum(p['read'] for p in per)
        stats['invalid'] = problems.count
        if stats['read'] == stats['invalid']:
            raise DataError(f'{", ".join(files)}: no valid records')
        stats['tokens'] = sum(sp['tokens'] for sp in splits.values())
        stats['trained_tokens'] = sum(sp['trained_tokens'] for sp in splits.values())
        stats['splits'] = splits
        stats['length'] = {'p50': percentile(hist, 50), 'p90': percentile(hist, 90),
                           'p99': percentile(hist, 99), 'max': int(np.flatnonzero(hist)[-1]) if hist.any() else 0}
        stats['problems'] = problems.first
        stats['mixture_by'] = mixture_by
        if stats['kept'] == 0:
            raise DataError(f'no example kept (dropped: {stats["dropped"]}); nothing written')
        source_rows = source_report(sources, per, mixture_by, train_src, train_trained)
        meta = writer.commit({
            'tokenizer': dict(tok.meta(), chat_format=fmt.meta()), 'chat_template': fmt.name,
            'train_on': args.train_on, 'max_length': args.max_length,
            'truncation': args.truncation, 'val_fraction': args.val_fraction, 'dedup': args.dedup,
            'inputs': files, 'sources': source_rows, 'mixture_by': mixture_by,
            'counts': {s: splits[s]['examples'] for s in splits}, 'splits': splits, 'stats': stats})
    for p in problems.first[:20]:
        print(f'skipped {p}', file=sys.stderr)
    if problems.count > 20:
        print(f'... and {problems.count - 20} more skipped records (first 100 in meta.json)', file=sys.stderr)
    print(f'prepare_sft: wrote {args.out_dir}\n' + format_audit(stats, source_rows))
    colour = sys.stdout.isatty()
    for k, (ids, mask) in enumerate(shown):
        print(f'--- example {k} ({len(ids)} tokens, trained highlighted) ---')
        print(highlight(tok, ids, mask, colour))
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--input', nargs='+', required=True,
                   help='sources: JSONL / JSON / Parquet / Arrow files or globs, each optionally '
                        'PATH:WEIGHT (a mixture)')
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
    p.add_argument('--mix_by', default='examples', choices=MIXTURE_BY,
                   help='weighted sources: the weights are shares of training examples or of '
                        'trained tokens (train_sft.py mixture_by can override)')
    p.add_argument('--dedup', action='store_true',
                   help='keep only the first of identical conversations (see above)')
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
