"""Chat records of every supported input format -> validated `messages` lists.

    for where, messages in iter_records('data.jsonl'):   # where = 'data.jsonl:12'
        ...

Input files: JSONL (read line by line, so any size), a JSON array (read whole), or Parquet / Arrow
IPC (.parquet, .arrow: the files Hugging Face datasets writes and caches; needs the optional pyarrow,
read in record batches of 256 rows, so any size). Each record, auto-detected (or forced with fmt=):
  messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
  sharegpt           {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
  alpaca             {"instruction": "...", "input": "...", "output": "..."}  (+ optional "system")
  prompt_completion  {"prompt": "...", "completion": "..."}  (either side may be a messages list)
  gsm8k              {"question": "...", "answer": "... #### 42"}
In Parquet / Arrow these are columns (nested lists of structs for messages); the format is detected
once per file from its columns, and only the columns it needs are read.
Messages may carry `train: true/false` (assistant turns only), `reasoning_content`, `tool_calls`;
role `tool` holds tool results (and may carry `tool_call_id`). A record-level "tools" list of
schemas (or a JSON string of one) is kept on the first message; ShareGPT turns may carry axolotl's
"weight": 0/1.
A bad record raises DataError `file:line: what is wrong` (Parquet / Arrow: `file:row N:`, N counted
from 0 like a datasets index), or is skipped and counted with skip_invalid. DataError is the one
error type of the whole data path (records, shards, batching).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import unicodedata

ROLES = ('system', 'user', 'assistant', 'tool')
FORMATS = ('auto', 'messages', 'sharegpt', 'alpaca', 'prompt_completion', 'gsm8k')
SHAREGPT_ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
                  'chatgpt': 'assistant', 'model': 'assistant', 'system': 'system', 'tool': 'tool',
                  'function': 'tool', 'observation': 'tool'}


class DataError(ValueError):
    """A user-facing problem with the data: a bad input file or record (the message starts with
    `file:line:`), a missing or damaged shard, an empty split, token ids the model cannot embed."""


# ----------------------------------------------------------------------------------------------
# Reading records

# format -> (the keys that identify it, in detection order; optional keys it reads)
FORMAT_KEYS = {'messages': (('messages',), ('tools',)),
               'sharegpt': (('conversations',), ('system', 'tools')),
               'alpaca': (('instruction', 'output'), ('input', 'system')),
               'prompt_completion': (('prompt', 'completion'), ()),
               'gsm8k': (('question', 'answer'), ())}
KNOWN_KEYS = ('"messages", "conversations", "instruction"+"output", "prompt"+"completion" or '
              '"question"+"answer"')


def _detect(rec) -> str:
    for fmt, (required, _) in FORMAT_KEYS.items():
        if all(k in rec for k in required):
            return fmt
    raise ValueError(f'unrecognised record: expected {KNOWN_KEYS}; got keys {sorted(rec)[:10]}')


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
        if m.get('tool_call_id') is not None:   # Mistral's template pairs results with calls by id
            if role != 'tool' or not isinstance(m['tool_call_id'], str):
                raise ValueError(f'{at}.tool_call_id: must be a string on a tool message')
            msg['tool_call_id'] = m['tool_call_id']
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
            role = SHAREGPT_ROLES.get(turn['from']) if isinstance(turn['from'], str) else None
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


def _json_array_items(path: str, data: bytes):
    """Yields (line, record_or_exception) from a JSON array (read whole: use JSONL for big data)."""
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


def _jsonl_items(lines):
    """Yields (line, record_or_exception) from (line number, bytes) pairs, one line at a time."""
    for line, raw in lines:
        raw = raw.rstrip(b'\n').rstrip(b'\r')
        if line == 1 and raw.startswith(b'\xef\xbb\xbf'):
            raw = raw[3:]
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


def _json_items(path: str):
    """Yields (line, record_or_exception) from a JSONL file (streamed: one line at a time, never
    the whole file) or a JSON array (read whole)."""
    try:
        f = open(path, 'rb')
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror})') from None
    with f:
        # text never holds NUL bytes; checkpoints (zip, safetensors) do in their first bytes: say what
        # the file is instead of a line of invalid UTF-8 (a swapped argument, a glob that caught
        # ckpt.pt). The first line only: a text file damaged further on gets its line number.
        # peek, not read + seek: a pipe cannot seek, and peek does not wait for a full block
        if b'\0' in f.peek(4096)[:4096].split(b'\n', 1)[0]:
            raise DataError(f'{path}: not a JSONL/JSON text file (binary data: is it a checkpoint?)')
        lines = enumerate(f, 1)
        blank = []
        for line, raw in lines:   # the first non-blank line tells JSONL from a JSON array
            if raw.strip(b' \t\r\n\xef\xbb\xbf'):
                break
            blank.append(raw)
        else:
            raise DataError(f'{path}:1: empty file (no records)')
        if raw.lstrip(b' \t\r\n\xef\xbb\xbf')[:1] == b'[':
            data = b''.join(blank) + raw + f.read()
            yield from _json_array_items(path, data[3:] if data.startswith(b'\xef\xbb\xbf') else data)
            return
        yield from _jsonl_items(itertools.chain([(line, raw)], lines))


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


# ----------------------------------------------------------------------------------------------
# Parquet and Arrow IPC (optional pyarrow)

ARROW_SUFFIXES = ('.parquet', '.arrow')
ARROW_BATCH_ROWS = 256   # rows converted to python at a time: memory stays bounded by a batch


def is_arrow(path: str) -> bool:
    return str(path).lower().endswith(ARROW_SUFFIXES)


def _pyarrow(path: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (submodules used below)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f'{path}: reading Parquet / Arrow files needs pyarrow, an optional '
                        'dependency: pip install pyarrow') from None
    return pyarrow


def _arrow_open(path: str):
    """-> (schema, a function yielding RecordBatches of the given columns). Parquet is read one
    row group at a time; an Arrow IPC file (random access) or stream (what datasets caches) one
    record batch at a time, from an ordinary file (not memory-mapped, so a memory cap holds)."""
    pa = _pyarrow(path)
    try:
        if path.lower().endswith('.parquet'):
            pf = pa.parquet.ParquetFile(path, pre_buffer=False)   # pre-buffering reads ahead
            return pf.schema_arrow, lambda cols: pf.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=cols)
        src = pa.OSFile(path)
        try:
            reader = pa.ipc.open_file(src)
            batches = lambda: (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            src.seek(0)
            reader = pa.ipc.open_stream(src)
            batches = lambda: iter(reader)
    except (OSError, pa.ArrowException) as e:
        kind = 'Parquet' if path.lower().endswith('.parquet') else 'Arrow IPC'
        raise DataError(f'{path}: cannot read as {kind} ({str(e).splitlines()[0][:200]})') from None

    def select(cols):
        for batch in batches():
            for start in range(0, batch.num_rows, ARROW_BATCH_ROWS):
                yield batch.slice(start, ARROW_BATCH_ROWS).select(cols)
    return reader.schema, select


def arrow_format(path: str, names, fmt: str = 'auto') -> tuple[str, list[str]]:
    """The record format of a Parquet / Arrow file from its column names -> (format, the columns
    to read). DataError naming the file and its columns when no format fits."""
    names = list(names)
    if fmt == 'auto':
        try:
            fmt = _detect(set(names))
        except ValueError:
            raise DataError(f'{path}: no columns of a known record format: expected {KNOWN_KEYS}; '
                            f'the file has columns {names[:20]}') from None
    required, optional = FORMAT_KEYS[fmt]
    missing = [k for k in required if k not in names]
    if missing:
        raise DataError(f'{path}: format {fmt!r} needs the column(s) {missing}; the file has '
                        f'columns {names[:20]}')
    return fmt, list(required) + [k for k in optional if k in names]


def _drop_nulls(value):
    """Arrow gives every row every struct field, null where a JSON record would have no key, at any
    depth (a tool's schema and a call's arguments get the other rows' fields): drop those nulls so
    the JSON rules apply unchanged. (A null meant as a value cannot be told apart in Arrow.)"""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _arrow_items(path: str, fmt: str):
    """Yields (row, record, format) from a Parquet / Arrow file, one record batch at a time."""
    schema, batches = _arrow_open(path)
    fmt, cols = arrow_format(path, schema.names, fmt)
    row = 0
    try:
        for batch in batches(cols):
            for rec in batch.to_pylist():
                yield row, _drop_nulls(rec), fmt
                row += 1
    except (OSError, ValueError) as e:   # pyarrow's errors derive from these
        if isinstance(e, DataError):
            raise
        raise DataError(f'{path}:row {row}: cannot read ({str(e).splitlines()[0][:200]})') from None


def check_input(path: str, fmt: str = 'auto') -> None:
    """The checks iter_records would fail on first, without reading records: the file exists and
    is readable; a Parquet / Arrow file has pyarrow and the columns of a record format."""
    if not os.path.exists(path):
        raise DataError(f'{path}: no such file')
    if not os.path.isfile(path):
        raise DataError(f'{path}: not a file')
    if fmt not in FORMATS:
        raise DataError(f'unknown --format {fmt!r} (expected one of {", ".join(FORMATS)})')
    if is_arrow(path):
        schema, _ = _arrow_open(path)
        arrow_format(path, schema.names, fmt)
    elif not os.access(path, os.R_OK):
        raise DataError(f'{path}: cannot read (permission denied)')


# ----------------------------------------------------------------------------------------------
# Reading any input file

def iter_records(path: str, fmt: str = 'auto', skip_invalid: bool = False, problems=None,
                 raw: bool = False):
    """Yields (f'{path}:{line}', messages) (Parquet / Arrow: f'{path}:row {n}'), streaming: memory
    does not grow with the file (except a JSON array, read whole). Bad records raise DataError, or
    with skip_invalid are appended to `problems` as 'file:line: what is wrong' strings and skipped.
    raw=True: (where, messages, the record as read, its format), for readers of extra keys."""
    if fmt not in FORMATS:
        raise DataError(f'unknown --format {fmt!r} (expected one of {", ".join(FORMATS)})')
    path = str(path)
    if is_arrow(path):
        items = ((f'{path}:row {row}', rec, rec_fmt) for row, rec, rec_fmt in _arrow_items(path, fmt))
    else:
        items = ((f'{path}:{line}', rec, fmt) for line, rec in _json_items(path))
    n = 0
    for where, rec, rec_fmt in items:
        try:
            if isinstance(rec, Exception):
                raise rec
            if rec_fmt == 'auto' and isinstance(rec, dict):
                rec_fmt = _detect(rec)
            msgs = to_messages(rec, rec_fmt)
        except ValueError as e:
            msg = f'{where}: {e}'
            if not skip_invalid:
                raise DataError(msg) from None
            if problems is not None:
                problems.append(msg)
            continue
        n += 1
        yield (where, msgs, rec, rec_fmt) if raw else (where, msgs)
    if n == 0 and not skip_invalid:
        raise DataError(f'{path}:1: no records' if not is_arrow(path) else f'{path}: no records (0 rows)')


def conversation_key(messages) -> bytes:
    """The 16-byte identity of a conversation for exact dedup. Two conversations are the same when
    they are equal after this normalization: every string NFC-normalized (what the tokenizer does
    too) with whitespace stripped at both ends, roles canonical (to_messages maps ShareGPT's
    'human'/'gpt' to 'user'/'assistant', so the input format does not matter), key order ignored.
    Everything else counts: a different system prompt, train flag, tool or reasoning text is a
    different conversation."""
    def norm(v):
        if isinstance(v, str):
            return unicodedata.normalize('NFC', v).strip()
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v
    text = json.dumps(norm(messages), sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=16).digest()


def load_records(path: str, fmt: str = 'auto', skip_invalid: bool = False) -> list[list[dict]]:
    """All records of one file as messages lists (DataError on a bad record unless skip_invalid)."""
    return [m for _, m in iter_records(path, fmt, skip_invalid)]

