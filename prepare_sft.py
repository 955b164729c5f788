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
schemas (or a JSON string of one) is kept on the first message and rendered as the Qwen3 tools
system turn; ShareGPT turns may carry axolotl's "weight": 0/1. See tokenizer.py for the exact
rendering and masking.
A bad record stops the run with `file:line: what is wrong` (or is skipped and counted with
--skip_invalid).

Output in --out_dir (see ShardDataset for the reader):
  train.bin / val.bin     tokens, uint32 (uint16 when the vocabulary fits), all examples back to back
  train.mask / val.mask   uint8, 1 = trained token (assistant content and its <|im_end|>)
  train.idx / val.idx     int64 offsets, n+1 entries: example i is [idx[i], idx[i+1])
  meta.json               format_version, tokenizer (name, hash, vocab size, special ids), settings,
                          counts and the audit stats
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

from tokenizer import ROLES, encode_conversation, load_tokenizer  # noqa: F401  (re-export)

FORMAT_VERSION = 1
FORMATS = ('auto', 'messages', 'sharegpt', 'alpaca', 'prompt_completion', 'gsm8k')
SHAREGPT_ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
                  'chatgpt': 'assistant', 'model': 'assistant', 'system': 'system', 'tool': 'tool',
                  'function': 'tool', 'observation': 'tool'}


class DataError(ValueError):
    """A bad input file or record; the message starts with `file:line:`."""


# ----------------------------------------------------------------------------------------------
# Reading records

def _detect(rec: dict) -> str:
    if 'messages' in rec:
        return 'messages'
    if 'conversations' in rec:
        return 'sharegpt'
    if 'instruction' in rec and 'output' in rec:
        return 'alpaca'
    if 'prompt' in rec and 'completion' in rec:
        return 'prompt_completion'
    if 'question' in rec and 'answer' in rec:
        return 'gsm8k'
    raise ValueError('unrecognised record: expected "messages", "conversations", '
                     '"instruction"+"output", "prompt"+"completion" or "question"+"answer"; '
                     f'got keys {sorted(rec)[:10]}')


def _need_str(rec: dict, key: str) -> str:
    if key not in rec:
        raise ValueError(f'missing key "{key}"')
    if not isinstance(rec[key], str):
        raise ValueError(f'"{key}" must be a string, got {type(rec[key]).__name__}')
    return rec[key]


def _clean_messages(msgs, where: str = 'messages') -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f'"{where}" must be a non-empty list of messages')
    out = []
    for k, m in enumerate(msgs):
        at = f'{where}[{k}]'
        if not isinstance(m, dict):
            raise ValueError(f'{at}: a message must be an object, got {type(m).__name__}')
        role = m.get('role')
        if role not in ROLES:
            raise ValueError(f'{at}.role: unknown role {role!r} (expected one of {", ".join(ROLES)})')
        content = m.get('content')
        if content is None and role == 'assistant' and m.get('tool_calls'):
            content = ''
        if not isinstance(content, str):
            raise ValueError(f'{at}.content: must be a string, got {type(content).__name__}')
        msg = {'role': role, 'content': content}
        if m.get('tools'):
            if k != 0:
                raise ValueError(f'{at}.tools: tool definitions belong on the first message '
                                 '(or on the record)')
            msg['tools'] = _tool_list(m['tools'], f'{at}.tools')
        if 'train' in m:
            if not isinstance(m['train'], bool):
                raise ValueError(f'{at}.train: must be true or false')
            if role != 'assistant':
                raise ValueError(f'{at}.train: only assistant messages can be trained')
            msg['train'] = m['train']
        if m.get('reasoning_content') is not None:
            if role != 'assistant' or not isinstance(m['reasoning_content'], str):
                raise ValueError(f'{at}.reasoning_content: must be a string on an assistant message')
            msg['reasoning_content'] = m['reasoning_content']
        if m.get('tool_calls'):
            if role != 'assistant' or not isinstance(m['tool_calls'], list):
                raise ValueError(f'{at}.tool_calls: must be a list on an assistant message')
            for j, call in enumerate(m['tool_calls']):
                fn = call.get('function', call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get('name'), str):
                    raise ValueError(f'{at}.tool_calls[{j}]: needs a "name" (or function.name) string')
            msg['tool_calls'] = m['tool_calls']
        out.append(msg)
    if not any(m['role'] == 'assistant' for m in out):
        raise ValueError(f'"{where}" has no assistant turn: nothing to train on')
    return out


def _tool_list(tools, where: str) -> list:
    if isinstance(tools, str):   # several public datasets store the schemas as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f'{where}: not valid JSON ({e.msg})') from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f'{where}: must be a list of tool schemas (objects)')
    return tools


def _with_tools(rec: dict, msgs: list) -> list:
    if rec.get('tools') and isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
        msgs = [dict(msgs[0], tools=_tool_list(rec['tools'], '"tools"'))] + list(msgs[1:])
    return msgs


def _side(value, role: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{'role': role, 'content': value}]
    if isinstance(value, list):
        return value
    raise ValueError(f'"{key}" must be a string or a list of messages, got {type(value).__name__}')


def to_messages(rec, fmt: str = 'auto') -> list[dict]:
    """One record of any supported format -> a validated messages list (raises ValueError)."""
    if not isinstance(rec, dict):
        raise ValueError(f'a record must be a JSON object, got {type(rec).__name__}')
    fmt = _detect(rec) if fmt == 'auto' else fmt
    if fmt == 'messages':
        if 'messages' not in rec:
            raise ValueError('missing key "messages"')
        return _clean_messages(_with_tools(rec, rec['messages']))
    if fmt == 'sharegpt':
        conv = rec.get('conversations')
        if not isinstance(conv, list) or not conv:
            raise ValueError('"conversations" must be a non-empty list')
        msgs = []
        for k, turn in enumerate(conv):
            if not isinstance(turn, dict) or 'from' not in turn or 'value' not in turn:
                raise ValueError(f'conversations[{k}]: needs "from" and "value"')
            role = SHAREGPT_ROLES.get(turn['from'])
            if role is None:
                raise ValueError(f'conversations[{k}].from: unknown role {turn["from"]!r} '
                                 f'(expected one of {", ".join(SHAREGPT_ROLES)})')
            msg = {'role': role, 'content': turn['value']}
            if 'weight' in turn and role == 'assistant':   # axolotl-style per-turn training flag
                msg['train'] = bool(turn['weight'])
            msgs.append(msg)
        if isinstance(rec.get('system'), str) and rec['system'] and msgs[0]['role'] != 'system':
            msgs.insert(0, {'role': 'system', 'content': rec['system']})
        return _clean_messages(_with_tools(rec, msgs), 'conversations')
    if fmt == 'alpaca':
        instruction, output = _need_str(rec, 'instruction'), _need_str(rec, 'output')
        extra = rec.get('input') or ''
        if not isinstance(extra, str):
            raise ValueError('"input" must be a string')
        msgs = [{'role': 'user', 'content': instruction + ('\n\n' + extra if extra else '')},
                {'role': 'assistant', 'content': output}]
        if isinstance(rec.get('system'), str) and rec['system']:
            msgs.insert(0, {'role': 'system', 'content': rec['system']})
        return _clean_messages(msgs)
    if fmt == 'prompt_completion':
        for key in ('prompt', 'completion'):
            if key not in rec:
                raise ValueError(f'missing key "{key}"')
        msgs = _side(rec['prompt'], 'user', 'prompt') + _side(rec['completion'], 'assistant', 'completion')
        return _clean_messages(msgs, 'prompt+completion')
    if fmt == 'gsm8k':
        return _clean_messages([{'role': 'user', 'content': _need_str(rec, 'question')},
                                {'role': 'assistant', 'content': _need_str(rec, 'answer')}])
    raise ValueError(f'unknown format {fmt!r} (expected one of {", ".join(FORMATS)})')


def _json_items(path: str, data: bytes):
    """Yields (line, record_or_exception) from a JSONL file or a JSON array."""
    if data.startswith(b'\xef\xbb\xbf'):
        data = data[3:]
    if data.lstrip()[:1] == b'[':
        try:
            text = data.decode('utf-8')
        except UnicodeDecodeError as e:
            line = data.count(b'\n', 0, e.start) + 1
            raise DataError(f'{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})') from None
        dec = json.JSONDecoder()
        pos = text.index('[') + 1
        while True:
            while pos < len(text) and text[pos] in ' \t\r\n':
                pos += 1
            if pos < len(text) and text[pos] == ']':
                if text[pos + 1:].strip(' \t\r\n'):
                    raise DataError(f'{path}:{text.count(chr(10), 0, pos) + 1}: invalid JSON '
                                    "(data after the array's closing ']')")
                return
            line, start = text.count('\n', 0, pos) + 1, pos
            try:
                rec, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                # a broken array cannot be resynchronised: always fatal
                raise DataError(f'{path}:{e.lineno}: invalid JSON ({e.msg})') from None
            except (ValueError, RecursionError) as e:
                raise DataError(f'{path}:{line}: invalid JSON ({_short(e)})') from None
            yield line, _no_lone_surrogates(rec, text[start:pos])
            while pos < len(text) and text[pos] in ' \t\r\n':
                pos += 1
            if pos < len(text) and text[pos] == ',':
                pos += 1
            elif pos >= len(text) or text[pos] != ']':
                raise DataError(f'{path}:{text.count(chr(10), 0, pos) + 1}: invalid JSON '
                                "(expected ',' or ']' in the array)")
        return
    for line, raw in enumerate(data.split(b'\n'), 1):
        raw = raw.rstrip(b'\r')
        if not raw.strip():
            continue
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            yield line, ValueError(f'invalid UTF-8 ({e.reason} at column {e.start + 1})')
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            rec = ValueError(f'invalid JSON ({e.msg} at column {e.colno})')
        except (ValueError, RecursionError) as e:   # 5000-digit numbers, 100000-deep nesting
            rec = ValueError(f'invalid JSON ({_short(e)})')
        yield line, _no_lone_surrogates(rec, text)


def _short(e: Exception) -> str:
    return f'{type(e).__name__}: {str(e)[:120]}'


def _no_lone_surrogates(rec, text: str):
    """rec, or a ValueError when a string in it holds half of a UTF-16 pair (JSON may escape one as
    "\\ud800"): it could not be encoded to UTF-8 later (tokenizer, split hash), so it is refused here
    where the line number is known."""
    if not isinstance(rec, Exception) and ('\\ud' in text or '\\uD' in text):
        try:
            json.dumps(rec, ensure_ascii=False).encode('utf-8')
        except UnicodeEncodeError:
            return ValueError('a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), '
                              'which is not valid Unicode')
    return rec


def iter_records(path: str, fmt: str = 'auto', skip_invalid: bool = False, problems=None):
    """Yields (f'{path}:{line}', messages). Bad records raise DataError, or with skip_invalid are
    appended to `problems` as 'file:line: what is wrong' strings and skipped."""
    if fmt not in FORMATS:
        raise DataError(f'unknown --format {fmt!r} (expected one of {", ".join(FORMATS)})')
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror})') from None
    if not data.strip(b' \t\r\n\xef\xbb\xbf'):
        raise DataError(f'{path}:1: empty file (no records)')
    n = 0
    for line, rec in _json_items(path, data):
        try:
            if isinstance(rec, Exception):
                raise rec
            msgs = to_messages(rec, fmt)
        except ValueError as e:
            msg = f'{path}:{line}: {e}'
            if not skip_invalid:
                raise DataError(msg) from None
            if problems is not None:
                problems.append(msg)
            continue
        n += 1
        yield f'{path}:{line}', msgs
    if n == 0 and not skip_invalid:
        raise DataError(f'{path}:1: no records')


def load_records(path: str, fmt: str = 'auto', skip_invalid: bool = False) -> list[list[dict]]:
    """All records of one file as messages lists (DataError on a bad record unless skip_invalid)."""
    return [m for _, m in iter_records(path, fmt, skip_invalid)]


# ----------------------------------------------------------------------------------------------
# Encoding (runs in worker processes with --num_proc > 1)

_WORKER: dict = {}


def _init_worker(tokenizer_name: str, train_on: str, chat_template: str, max_length: int,
                 truncation: str):
    _WORKER.update(tok=load_tokenizer(tokenizer_name), train_on=train_on,
                   chat_template=chat_template, max_length=max_length, truncation=truncation)


def _encode_one(msgs):
    """-> (ids uint32 array | None, mask uint8 array | None, info dict)."""
    w = _WORKER
    tok = w['tok']
    ids, labels = encode_conversation(msgs, tok, w['train_on'], w['chat_template'])
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(labels, dtype=np.int64) != -100
    im_end_turns = int(np.count_nonzero(mask & (ids == tok.im_end_id)))
    info = {'length': len(ids), 'turns': im_end_turns, 'truncated': False, 'drop': None}
    if len(ids) > w['max_length']:
        if w['truncation'] == 'drop':
            info['drop'] = f'longer than max_length={w["max_length"]}'
            return None, None, info
        ids, mask = ids[:w['max_length']], mask[:w['max_length']]
        info['truncated'] = True
    if not mask.any():
        info['drop'] = 'no trained token after truncation' if info['truncated'] else 'no trained token'
        return None, None, info
    info['turns_closed'] = int(np.count_nonzero(mask & (ids == tok.im_end_id)))
    return ids, mask.astype(np.uint8), info


def _encode_chunk(chunk):
    return [_encode_one(m) for m in chunk]


def _split_of(msgs, val_fraction: float) -> str:
    # content hash: stable across runs, machines and file order; duplicates land together
    h = hashlib.sha256(json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode()).digest()
    return 'val' if int.from_bytes(h[:8], 'big') / 2.0**64 < val_fraction else 'train'


# ----------------------------------------------------------------------------------------------
# Reading shards

class ShardDataset:
    """Memory-mapped reader of one split written by prepare_sft.py.

    ds = ShardDataset('data/my_sft', 'train'); input_ids, labels = ds[i]   (int64 numpy arrays,
    labels = -100 where not trained); ds.lengths = token length of every example; ds.meta = meta.json.
    """

    def __init__(self, data_dir: str, split: str = 'train'):
        meta_path = os.path.join(data_dir, 'meta.json')
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f'{meta_path}: not found (run prepare_sft.py to create it)')
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'{meta_path}: unreadable ({e})') from None
        if self.meta.get('format_version') != FORMAT_VERSION:
            raise ValueError(f'{meta_path}: format_version {self.meta.get("format_version")!r}, this '
                             f'reader understands {FORMAT_VERSION}; re-run prepare_sft.py')
        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        dtype = np.dtype(self.meta.get('token_dtype', 'uint32'))
        paths = {ext: os.path.join(data_dir, f'{split}.{ext}') for ext in ('bin', 'mask', 'idx')}
        for p in paths.values():
            if not os.path.exists(p):
                raise FileNotFoundError(f'{p}: missing shard file (listed by {meta_path})')
        self.idx = self._map(paths['idx'], np.int64)
        n_tok = int(self.idx[-1]) if len(self.idx) else -1
        if len(self.idx) == 0 or self.idx[0] != 0 or np.any(np.diff(self.idx) < 0):
            raise ValueError(f'{paths["idx"]}: corrupt offsets index (must start at 0 and not decrease)')
        expected_n = self.meta.get('splits', {}).get(split, {}).get('examples')
        if expected_n is not None and expected_n != len(self.idx) - 1:
            raise ValueError(f'{paths["idx"]}: {len(self.idx) - 1} examples but meta.json says {expected_n}')
        for ext, dt in (('bin', dtype), ('mask', np.uint8)):
            size = os.path.getsize(paths[ext])
            if size != n_tok * np.dtype(dt).itemsize:
                raise ValueError(f'{paths[ext]}: {size} bytes, but {paths["idx"]} says {n_tok} tokens '
                                 f'of {np.dtype(dt).name} (truncated or mismatched shard)')
        self.tokens = self._map(paths['bin'], dtype)
        self.mask = self._map(paths['mask'], np.uint8)
        self.lengths = np.diff(self.idx)
        self.split = split

    @staticmethod
    def _map(path, dtype):
        # np.memmap refuses empty files; an empty split is legitimate
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode='r')

    def __len__(self) -> int:
        return len(self.idx) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f'example {i} out of range for {self.split} ({n} examples)')
        a, b = int(self.idx[i]), int(self.idx[i + 1])
        ids = self.tokens[a:b].astype(np.int64)
        labels = np.where(self.mask[a:b] != 0, ids, -100)
        return ids, labels


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
             ('assistant turns ending in <|im_end|>', f"{stats['turns_closed']} / {stats['turns']}")]
    w = max(len(r[0]) for r in rows)
    return '\n'.join(f'  {k:<{w}}  {v}' for k, v in rows)


def prepare(args) -> dict:
    from tqdm import tqdm
    if not 0.0 <= args.val_fraction < 1.0:
        raise DataError(f'--val_fraction must be in [0, 1), got {args.val_fraction}')
    if args.max_length < 2:
        raise DataError(f'--max_length must be >= 2, got {args.max_length}')
    files = _expand_inputs(args.input)
    try:
        tok = load_tokenizer(args.tokenizer)
    except ValueError as e:
        raise DataError(str(e)) from None
    problems: list[str] = []
    records = []
    for path in files:
        records += [m for _, m in iter_records(path, args.format, args.skip_invalid, problems)]
    if not records:
        raise DataError(f'{", ".join(files)}: no valid records')

    os.makedirs(args.out_dir, exist_ok=True)
    dtype = np.uint32 if tok.vocab_size > 65535 else np.uint16
    tmp = f'.tmp-{os.getpid()}'
    _remove_stale_tmp(args.out_dir)
    final = {f'{s}.{e}': os.path.join(args.out_dir, f'{s}.{e}') for s in ('train', 'val')
             for e in ('bin', 'mask', 'idx')}
    final['meta.json'] = os.path.join(args.out_dir, 'meta.json')
    tmp_paths = {k: v + tmp for k, v in final.items()}
    handles = {}
    stats = {'read': len(records) + len(problems), 'invalid': len(problems), 'kept': 0,
             'truncated': 0, 'dropped': {}, 'tokens': 0, 'trained_tokens': 0, 'turns': 0,
             'turns_closed': 0}
    splits = {s: {'examples': 0, 'tokens': 0, 'trained_tokens': 0} for s in ('train', 'val')}
    offsets = {'train': [0], 'val': [0]}
    lengths, shown = [], []
    init = (args.tokenizer, args.train_on, args.chat_template, args.max_length, args.truncation)
    try:
        for k in ('train.bin', 'train.mask', 'val.bin', 'val.mask'):
            handles[k] = open(tmp_paths[k], 'wb')
        chunk = 256
        chunks = [records[i:i + chunk] for i in range(0, len(records), chunk)]
        if args.num_proc > 1:
            pool = mp.get_context('spawn' if sys.platform == 'darwin' else 'fork').Pool(
                args.num_proc, initializer=_init_worker, initargs=init)
            results = pool.imap(_encode_chunk, chunks)  # imap keeps the input order
        else:
            pool = None
            _init_worker(*init)
            results = map(_encode_chunk, chunks)
        bar = tqdm(total=len(records), desc='encoding', unit='ex', disable=None)
        try:
            for chunk_msgs, chunk_out in zip(chunks, results):
                for msgs, (ids, mask, info) in zip(chunk_msgs, chunk_out):
                    stats['turns'] += info['turns']
                    if ids is None:
                        stats['dropped'][info['drop']] = stats['dropped'].get(info['drop'], 0) + 1
                        continue
                    split = _split_of(msgs, args.val_fraction)
                    handles[f'{split}.bin'].write(ids.astype(dtype).tobytes())
                    handles[f'{split}.mask'].write(mask.tobytes())
                    offsets[split].append(offsets[split][-1] + len(ids))
                    trained = int(mask.sum())
                    sp = splits[split]
                    sp['examples'] += 1
                    sp['tokens'] += len(ids)
                    sp['trained_tokens'] += trained
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
        for h in handles.values():
            h.close()
        for s in ('train', 'val'):
            np.asarray(offsets[s], dtype=np.int64).tofile(tmp_paths[f'{s}.idx'])
        stats['tokens'] = sum(sp['tokens'] for sp in splits.values())
        stats['trained_tokens'] = sum(sp['trained_tokens'] for sp in splits.values())
        stats['splits'] = splits
        stats['length'] = {'p50': _percentile(lengths, 50), 'p90': _percentile(lengths, 90),
                           'p99': _percentile(lengths, 99), 'max': max(lengths, default=0)}
        stats['problems'] = problems[:100]
        if stats['kept'] == 0:
            raise DataError(f'no example kept (dropped: {stats["dropped"]}); nothing written')
        meta = {'format_version': FORMAT_VERSION, 'tokenizer': tok.meta(),
                'token_dtype': np.dtype(dtype).name, 'chat_template': args.chat_template,
                'train_on': args.train_on, 'max_length': args.max_length,
                'truncation': args.truncation, 'val_fraction': args.val_fraction,
                'inputs': files, 'counts': {s: splits[s]['examples'] for s in splits},
                'splits': splits, 'stats': stats}
        with open(tmp_paths['meta.json'], 'w') as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        _finish(tmp_paths, final)
    except BaseException:
        for h in handles.values():
            h.close()
        for p in tmp_paths.values():
            if os.path.exists(p):
                os.remove(p)
        raise
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


def _remove_stale_tmp(out_dir: str):
    # leftovers of a killed run (never read: the reader only opens the final names)
    for name in os.listdir(out_dir):
        base, _, pid = name.rpartition('.tmp-')
        if base and pid.isdigit() and base.split('.')[0] in ('train', 'val', 'meta'):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass


def _finish(tmp_paths: dict, final: dict):
    # meta.json last: a directory with a meta.json always has complete shards beside it
    for k in sorted(final, key=lambda k: k == 'meta.json'):
        os.replace(tmp_paths[k], final[k])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--input', nargs='+', required=True, help='JSONL / JSON files or globs')
    p.add_argument('--out_dir', required=True)
    p.add_argument('--val_fraction', type=float, default=0.05)
    p.add_argument('--max_length', type=int, default=2048)
    p.add_argument('--format', default='auto', choices=FORMATS)
    p.add_argument('--tokenizer', default='qwen3', help="'qwen3' or a local HF tokenizer dir")
    p.add_argument('--chat_template', default='chatml', choices=('chatml', 'qwen3'))
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
