"""Chat records of every supported input format -> validated `messages` lists.

    for where, messages in iter_records('data.jsonl'):   # where = 'data.jsonl:12'
        ...

Input: JSONL or a JSON array; each record, auto-detected (or forced with fmt=):
  messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
  sharegpt           {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
  alpaca             {"instruction": "...", "input": "...", "output": "..."}  (+ optional "system")
  prompt_completion  {"prompt": "...", "completion": "..."}  (either side may be a messages list)
  gsm8k              {"question": "...", "answer": "... #### 42"}
Messages may carry `train: true/false` (assistant turns only), `reasoning_content`, `tool_calls`;
role `tool` holds tool results (and may carry `tool_call_id`). A record-level "tools" list of
schemas (or a JSON string of one) is kept on the first message; ShareGPT turns may carry axolotl's
"weight": 0/1.
A bad record raises DataError `file:line: what is wrong` (or is skipped and counted with
skip_invalid). DataError is the one error type of the whole data path (records, shards, batching).
"""
from __future__ import annotations

import json

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

