"""chat_records: every input format -> validated messages; record errors, never tracebacks; Parquet /
Arrow input, streaming JSONL, the dedup key."""
import json
import os
import sys
import threading

import pytest

from chat_records import (FORMATS, DataError, check_input, conversation_key, iter_records, load_records,
                          to_messages)


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
    return str(path)


def chats(n):
    return [{'messages': [{'role': 'user', 'content': f'q{i} <|im_end|> 数字'},
                          {'role': 'assistant', 'content': f'a{i}'}]} for i in range(n)]


def test_every_format_parses_to_the_same_messages(tmp_path):
    sys_, q, a = 'Be kind.', 'What is 6*7?', 'It is 42.\n#### 42'
    expected = [{'role': 'system', 'content': sys_}, {'role': 'user', 'content': q},
                {'role': 'assistant', 'content': a}]
    records = {
        'messages': {'messages': expected},
        'sharegpt': {'conversations': [{'from': 'system', 'value': sys_}, {'from': 'human', 'value': q},
                                       {'from': 'gpt', 'value': a}]},
        'alpaca': {'system': sys_, 'instruction': q, 'input': '', 'output': a},
        'prompt_completion': {'prompt': expected[:2], 'completion': [expected[2]]},
    }
    for fmt, rec in records.items():
        path = write_jsonl(tmp_path / f'{fmt}.jsonl', [rec])
        assert load_records(path) == [expected], fmt
        assert load_records(path, fmt=fmt) == [expected], fmt
    # formats without a system prompt
    no_sys = expected[1:]
    for fmt, rec in {'prompt_completion': {'prompt': q, 'completion': a},
                     'gsm8k': {'question': q, 'answer': a},
                     'alpaca': {'instruction': q, 'output': a}}.items():
        path = write_jsonl(tmp_path / f'{fmt}2.jsonl', [rec])
        assert load_records(path) == [no_sys] == load_records(path, fmt=fmt), fmt
    path = write_jsonl(tmp_path / 'alpaca_input.jsonl', [{'instruction': 'Sum:', 'input': '1 2', 'output': '3'}])
    assert load_records(path)[0][0]['content'] == 'Sum:\n\n1 2'


def test_json_array_bom_and_crlf_are_read(tmp_path):
    recs = chats(3)
    arr = tmp_path / 'a.json'
    arr.write_bytes(b'\xef\xbb\xbf' + json.dumps(recs, indent=2).replace('\n', '\r\n').encode())
    jl = tmp_path / 'b.jsonl'
    jl.write_bytes(b'\xef\xbb\xbf' + b'\r\n'.join(json.dumps(r).encode() for r in recs) + b'\r\n\r\n')
    expected = [r['messages'] for r in recs]
    assert load_records(str(arr)) == expected == load_records(str(jl))


VALID = [
    {'messages': [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'u'},
                  {'role': 'assistant', 'content': 'a', 'reasoning_content': 'r', 'train': True,
                   'tool_calls': [{'function': {'name': 'f', 'arguments': {}}}]}], 'tools': [{'name': 'f'}]},
    {'conversations': [{'from': 'human', 'value': 'u'}, {'from': 'gpt', 'value': 'a', 'weight': 1}],
     'system': 's', 'tools': '[{"name": "f"}]'},
    {'instruction': 'i', 'input': 'x', 'output': 'o', 'system': 's'},
    {'prompt': 'p', 'completion': 'c'},
    {'prompt': [{'role': 'user', 'content': 'p'}], 'completion': [{'role': 'assistant', 'content': 'c'}]},
    {'question': 'q', 'answer': 'a #### 1'},
]
ODD_VALUES = [None, 1, 1.5, True, [], {}, [1], {'a': 1}, 'str', [{'x': 1}], [[1]]]


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _replaced(rec, path, value):
    rec = json.loads(json.dumps(rec))
    if not path:
        return value
    node = rec
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return rec


def test_any_value_of_any_type_anywhere_in_a_record_is_a_record_error_not_a_traceback():
    """Every field of a valid record of each format replaced by values of every JSON type, parsed
    under every --format: a ValueError (which iter_records turns into `file:line: ...`) or a result."""
    tried = 0
    for rec in VALID:
        assert to_messages(rec)
        for path in list(_paths(rec)):
            for value in ODD_VALUES:
                for fmt in FORMATS:
                    tried += 1
                    try:
                        to_messages(_replaced(rec, path, value), fmt)
                    except ValueError:
                        pass
    assert tried > 3000


@pytest.mark.parametrize('value', [['human'], {'role': 'user'}, 3])
def test_a_sharegpt_role_that_is_not_a_string_is_reported_with_its_line_also_when_skipping(tmp_path, value):
    good = {'conversations': [{'from': 'human', 'value': 'x'}, {'from': 'gpt', 'value': 'y'}]}
    bad = {'conversations': [{'from': value, 'value': 'x'}, {'from': 'gpt', 'value': 'y'}]}
    path = write_jsonl(tmp_path / 'd.jsonl', [good, bad, good])
    with pytest.raises(DataError, match=rf'{path}:2: conversations\[0\]\.from: unknown role'):
        load_records(path)
    problems = []
    assert len(list(iter_records(path, skip_invalid=True, problems=problems))) == 2
    assert len(problems) == 1 and problems[0].startswith(f'{path}:2: conversations[0].from')


# ---------------------------------------------------------------- Parquet / Arrow, streaming, dedup

U = {'role': 'user', 'content': 'What is 6*7?'}
A = {'role': 'assistant', 'content': '42'}
RECORDS = {   # one record per format, as JSON; each becomes [U, A] (+ the extras noted)
    'messages': [{'messages': [U, A]}, {'messages': [U, dict(A, train=False), U, A]}],
    'sharegpt': [{'conversations': [{'from': 'human', 'value': U['content']},
                                    {'from': 'gpt', 'value': A['content']}], 'system': 'Be brief.'}],
    'alpaca': [{'instruction': U['content'], 'input': '', 'output': A['content']},
               {'instruction': U['content'], 'input': 'exactly', 'output': A['content']}],
    'prompt_completion': [{'prompt': U['content'], 'completion': A['content']}],
    'gsm8k': [{'question': U['content'], 'answer': A['content'], 'id': 7}],
}


def write_arrow(path, records, kind):
    pa = pytest.importorskip('pyarrow')   # optional at run time; requirements-dev.txt installs it
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist(records)
    if kind == 'parquet':
        pq.write_table(table, path, row_group_size=1)
    else:
        with pa.OSFile(str(path), 'wb') as f:
            writer = (pa.ipc.new_file if kind == 'arrow_file' else pa.ipc.new_stream)(f, table.schema)
            writer.write_table(table, max_chunksize=1)
            writer.close()
    return str(path)


@pytest.mark.parametrize('kind', ['parquet', 'arrow_file', 'arrow_stream'])
@pytest.mark.parametrize('fmt', sorted(RECORDS))
def test_parquet_and_arrow_rows_read_like_the_same_jsonl_records(tmp_path, fmt, kind):
    recs = RECORDS[fmt]
    jsonl = tmp_path / 'r.jsonl'
    jsonl.write_text(''.join(json.dumps(r) + '\n' for r in recs))
    suffix = '.parquet' if kind == 'parquet' else '.arrow'
    path = write_arrow(tmp_path / f'r{suffix}', recs, kind)
    got = list(iter_records(path))
    assert [m for _, m in got] == load_records(str(jsonl))
    assert [w for w, _ in got] == [f'{path}:row {i}' for i in range(len(recs))]
    assert [m for _, m in iter_records(path, fmt=fmt)] == load_records(str(jsonl), fmt=fmt)


def test_parquet_tool_schemas_and_calls_get_no_fields_of_other_rows(tmp_path):
    """Arrow gives each row every struct field of every row, null-filled, nested ones too: the
    weather call would carry the time tool's `zone: null` and train it."""
    def rec(name, arg):
        return {'tools': [{'type': 'function', 'function': {'name': name, 'parameters': {
                    'type': 'object', 'properties': {arg: {'type': 'string'}}}}}],
                'messages': [U, {'role': 'assistant', 'content': '', 'tool_calls': [
                    {'type': 'function', 'function': {'name': name, 'arguments': {arg: 'v'}}}]},
                    {'role': 'tool', 'content': 'r'}, A]}
    recs = [rec('weather', 'city'), rec('time', 'zone')]
    jsonl = tmp_path / 'r.jsonl'
    jsonl.write_text(''.join(json.dumps(r) + '\n' for r in recs))
    assert load_records(write_arrow(tmp_path / 'r.parquet', recs, 'parquet')) == load_records(str(jsonl))


def test_file_without_the_columns_of_a_format_is_refused_before_reading_naming_its_columns(tmp_path):
    path = write_arrow(tmp_path / 'text.parquet', [{'text': 'hi', 'id': 1}], 'parquet')
    with pytest.raises(DataError, match=r"text.parquet: no columns of a known record format.*\['text', 'id'\]"):
        check_input(path)
    with pytest.raises(DataError, match=r"text.parquet: format 'alpaca' needs the column\(s\) \['instruction', 'output'\]"):
        check_input(path, 'alpaca')
    bad = tmp_path / 'not.parquet'
    bad.write_bytes(b'{"messages": []}\n')
    with pytest.raises(DataError, match='not.parquet: cannot read as Parquet'):
        check_input(str(bad))
    with pytest.raises(DataError, match='missing.arrow: no such file'):
        check_input(str(tmp_path / 'missing.arrow'))


def test_bad_row_names_file_and_row_and_can_be_skipped(tmp_path):
    recs = [{'messages': [U, A]}, {'messages': [U]}, {'messages': [U, {'role': 'robot', 'content': 'x'}]}]
    path = write_arrow(tmp_path / 'd.parquet', recs, 'parquet')
    with pytest.raises(DataError, match=r'd.parquet:row 1: "messages" has no assistant turn'):
        list(iter_records(path))
    problems = []
    assert [m for _, m in iter_records(path, skip_invalid=True, problems=problems)] == [[U, A]]
    assert [p.split(': ')[0] for p in problems] == [f'{path}:row 1', f'{path}:row 2']


def test_missing_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = write_arrow(tmp_path / 'd.parquet', [{'messages': [U, A]}], 'parquet')
    monkeypatch.setitem(sys.modules, 'pyarrow', None)   # import pyarrow -> ImportError
    with pytest.raises(DataError, match='d.parquet: reading Parquet / Arrow files needs pyarrow.*pip install pyarrow'):
        list(iter_records(path))


def test_jsonl_records_stream_before_the_file_ends(tmp_path):
    """JSONL is read line by line, never whole (it may not fit in memory): through a pipe, the
    first record arrives while the writer still holds back the second half of the file."""
    fifo = tmp_path / 'd.jsonl'
    os.mkfifo(fifo)
    line = json.dumps({'messages': [U, A]}) + '\n'
    first_seen, state = threading.Event(), {}

    def writer():
        with open(fifo, 'w') as f:
            f.write(line * 50)
            f.flush()
            state['held_back'] = first_seen.wait(timeout=30)
            f.write(line * 50)
    t = threading.Thread(target=writer)
    t.start()
    records = iter_records(str(fifo))
    assert next(records)[0] == f'{fifo}:1'
    first_seen.set()
    assert sum(1 for _ in records) == 99
    t.join()
    assert state['held_back']


def test_conversation_key_ignores_nfc_end_whitespace_role_aliases_and_key_order():
    base = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'café?'},
            {'role': 'assistant', 'content': 'Oui.'}]
    same = [{'content': '  Be brief.\n', 'role': 'system'}, {'role': 'user', 'content': 'cafe\u0301?'},
            {'role': 'assistant', 'content': 'Oui. '}]
    assert conversation_key(base) == conversation_key(same)
    assert len(conversation_key(base)) == 16
    # ShareGPT's role names are canonical after parsing: the same conversation in two formats
    sharegpt = load_records_from({'conversations': [{'from': 'human', 'value': 'hi'}, {'from': 'gpt', 'value': 'yo'}]})
    messages = load_records_from({'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]})
    assert conversation_key(sharegpt) == conversation_key(messages)
    for different in ([dict(m) for m in base[1:]],                                    # no system prompt
                      base[:2] + [dict(base[2], train=False)],                          # a train flag
                      base[:2] + [dict(base[2], content='Oui, oui.')],                  # inner text
                      base[:1] + [dict(base[1], content='café ?')] + base[2:]):         # inner space
        assert conversation_key(different) != conversation_key(base)


def load_records_from(rec):
    return to_messages(rec)


def test_binary_file_is_named_as_such_not_as_a_line_of_bad_utf8(tmp_path):
    p = tmp_path / 'ckpt.pt'
    p.write_bytes(b'PK\x03\x04\x00\x00\x08\x08' + bytes(range(256)))   # a zip, as torch.save writes
    with pytest.raises(DataError, match=r'^\S*ckpt.pt: not a JSONL/JSON text file \(binary data: is it a '
                                        r'checkpoint\?\)$'):
        load_records(str(p))


def test_raw_records_come_with_their_format_for_readers_of_extra_keys(tmp_path):
    p = write_jsonl(tmp_path / 'mixed.jsonl', [{**chats(1)[0], 'reference': 'a0'},
                                               {'question': 'q', 'answer': 'a #### 1'}])
    got = [(where, rec.get('reference'), fmt) for where, _, rec, fmt in iter_records(p, raw=True)]
    assert got == [(f'{p}:1', 'a0', 'messages'), (f'{p}:2', None, 'gsm8k')]
