"""chat_records: every input format -> validated messages; record errors, never tracebacks."""
import json

import pytest

from chat_records import FORMATS, DataError, iter_records, load_records, to_messages


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
