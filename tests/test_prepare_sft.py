import json
import os
import random

import pytest

import prepare_sft
from chat_format import encode_conversation
from chat_records import DataError, load_records
from prepare_sft import main
from sft_data import ShardDataset
from tokenizer import load_tokenizer

SHARDS = ('train.bin', 'train.mask', 'train.idx', 'val.bin', 'val.mask', 'val.idx', 'meta.json')


@pytest.fixture(scope='module')
def tok():
    return load_tokenizer('qwen3')


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
    return str(path)


def chats(n, seed=0):
    rng = random.Random(seed)
    words = 'alpha beta gamma delta épsilon 数字 emoji😀 <|im_end|> tokens'.split()
    out = []
    for i in range(n):
        msgs = [{'role': 'system', 'content': 'Be brief.'}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):
            msgs.append({'role': 'user', 'content': f'q{i} ' + ' '.join(rng.choices(words, k=rng.randint(1, 30)))})
            msgs.append({'role': 'assistant', 'content': f'a{i} ' + ' '.join(rng.choices(words, k=rng.randint(0, 40)))})
        out.append({'messages': msgs})
    return out


def run(*argv):
    return main([str(a) for a in argv])


GOOD = json.dumps({'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]})
BAD_RECORDS = {
    'invalid_json': ('{"messages": [', 'invalid JSON'),
    'not_an_object': ('[1, 2]', 'must be a JSON object'),
    'unrecognised_keys': ('{"text": "hello"}', 'unrecognised record'),
    'unknown_role': ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                     "messages[0].role: unknown role 'bot'"),
    'non_string_content': ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
                           'messages[0].content: must be a string'),
    'no_assistant_turn': ('{"messages": [{"role": "user", "content": "x"}]}', 'no assistant turn'),
    'empty_messages': ('{"messages": []}', 'non-empty list'),
    'missing_output': ('{"instruction": "x", "input": "y"}', 'unrecognised record'),
    'sharegpt_unknown_from': ('{"conversations": [{"from": "alien", "value": "x"}]}', "unknown role 'alien'"),
    'sharegpt_from_a_list': ('{"conversations": [{"from": ["human"], "value": "x"}]}', "unknown role ['human']"),
    'sharegpt_from_an_object': ('{"conversations": [{"from": {"r": 1}, "value": "x"}]}', 'conversations[0].from'),
    'gsm8k_non_string': ('{"question": "x", "answer": 4}', '"answer" must be a string'),
    'train_on_user': ('{"messages": [{"role": "user", "content": "x", "train": true}, '
                      '{"role": "assistant", "content": "y"}]}', 'only assistant messages'),
}


@pytest.mark.parametrize('kind', sorted(BAD_RECORDS))
def test_bad_record_stops_with_file_and_line(tmp_path, kind):
    line, what = BAD_RECORDS[kind]
    path = tmp_path / 'data.jsonl'
    path.write_text(GOOD + '\n\n' + line + '\n' + GOOD + '\n')
    with pytest.raises(SystemExit) as e:
        run('--input', path, '--out_dir', tmp_path / 'out')
    assert str(e.value).startswith(f'prepare_sft: {path}:3: ')
    assert what in str(e.value)
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_invalid_utf8_empty_file_and_forced_format_errors(tmp_path):
    bad = tmp_path / 'bad.jsonl'
    bad.write_bytes(GOOD.encode() + b'\n{"messages": "\xff\xfe"}\n')
    with pytest.raises(SystemExit, match=rf'{bad}:2: invalid UTF-8'):
        run('--input', bad, '--out_dir', tmp_path / 'o')
    empty = tmp_path / 'empty.jsonl'
    empty.write_bytes(b'\xef\xbb\xbf\n')
    with pytest.raises(SystemExit, match=rf'{empty}:1: empty file'):
        run('--input', empty, '--out_dir', tmp_path / 'o')
    with pytest.raises(SystemExit, match=rf'{bad}:1: missing key "question"'):
        run('--input', bad, '--out_dir', tmp_path / 'o', '--format', 'gsm8k')
    with pytest.raises(SystemExit, match='no file matches'):
        run('--input', tmp_path / 'nothing*.jsonl', '--out_dir', tmp_path / 'o')
    arr = tmp_path / 'broken.json'
    arr.write_text('[\n' + GOOD + ',\n{"messages": \n')
    with pytest.raises(SystemExit, match=rf'{arr}:\d+: invalid JSON'):
        run('--input', arr, '--out_dir', tmp_path / 'o')


def test_skip_invalid_counts_and_reports(tmp_path, capsys):
    lines = [GOOD] + [l for l, _ in BAD_RECORDS.values()] + [GOOD]
    path = tmp_path / 'mixed.jsonl'
    path.write_bytes(('\n'.join(lines) + '\n').encode() + b'{"messages": "\xff"}\n')
    meta = run('--input', path, '--out_dir', tmp_path / 'out', '--skip_invalid', '--val_fraction', '0')
    stats = meta['stats']
    assert stats['read'] == len(lines) + 1 and stats['invalid'] == len(BAD_RECORDS) + 1 and stats['kept'] == 2
    assert all(p.startswith(f'{path}:') for p in stats['problems'])
    err = capsys.readouterr().err
    assert f'skipped {path}:2: invalid JSON' in err


def test_truncation_keeps_the_start_and_drops_untrainable_examples(tmp_path, tok):
    long_answer = 'word ' * 300
    recs = [{'messages': [{'role': 'user', 'content': 'short'}, {'role': 'assistant', 'content': long_answer}]},
            {'messages': [{'role': 'user', 'content': 'long ' * 300}, {'role': 'assistant', 'content': 'x'}]},
            {'messages': [{'role': 'user', 'content': 'fits'}, {'role': 'assistant', 'content': 'fine'}]},
            {'messages': [{'role': 'user', 'content': 'u'}, {'role': 'assistant', 'content': 'n', 'train': False}]}]
    path = write_jsonl(tmp_path / 'd.jsonl', recs)
    meta = run('--input', path, '--out_dir', tmp_path / 'out', '--max_length', 64, '--val_fraction', 0)
    st = meta['stats']
    assert (st['read'], st['kept'], st['truncated']) == (4, 2, 1)
    assert st['dropped'] == {'no trained token after truncation': 1, 'no trained token': 1}
    assert st['turns'] == 3 and st['turns_closed'] == 1   # the truncated reply lost its <|im_end|>
    ds = ShardDataset(tmp_path / 'out', 'train')
    full_ids, full_labels = encode_conversation(recs[0]['messages'], tok)
    ids, labels = ds[0]
    assert ids.tolist() == full_ids[:64] and labels.tolist() == full_labels[:64]
    meta = run('--input', path, '--out_dir', tmp_path / 'out2', '--max_length', 64, '--val_fraction', 0,
               '--truncation', 'drop')
    assert meta['stats']['kept'] == 1
    assert meta['stats']['dropped']['longer than max_length=64'] == 2


def test_shards_round_trip_and_split_is_deterministic_by_content(tmp_path, tok):
    recs = chats(60)
    a = write_jsonl(tmp_path / 'a.jsonl', recs)
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    b = write_jsonl(tmp_path / 'b.jsonl', shuffled)
    meta = run('--input', a, '--out_dir', tmp_path / 'A', '--val_fraction', 0.3, '--max_length', 4096)
    run('--input', b, '--out_dir', tmp_path / 'B', '--val_fraction', 0.3, '--max_length', 4096)
    assert meta['format_version'] == 1 and meta['tokenizer']['hash'] == tok.hash
    assert meta['token_dtype'] == 'uint32' and meta['tokenizer']['im_end_id'] == 151645
    assert sorted(os.listdir(tmp_path / 'A')) == sorted(SHARDS)
    seen = []
    for split in ('train', 'val'):
        ds_a, ds_b = ShardDataset(tmp_path / 'A', split), ShardDataset(tmp_path / 'B', split)
        assert 0 < len(ds_a) == len(ds_b)
        got_a = sorted(tuple(ds_a[i][0]) for i in range(len(ds_a)))
        assert got_a == sorted(tuple(ds_b[i][0]) for i in range(len(ds_b)))
        assert ds_a.lengths.tolist() == [len(ds_a[i][0]) for i in range(len(ds_a))]
        seen += [(ds_a[i][0].tolist(), ds_a[i][1].tolist()) for i in range(len(ds_a))]
    expected = [encode_conversation(r['messages'], tok) for r in recs]
    assert sorted(seen) == sorted((list(i), list(l)) for i, l in expected)


def test_failed_run_leaves_no_shard(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / 'd.jsonl', chats(20))
    out = tmp_path / 'out'

    def boom(*a, **k):
        raise RuntimeError('disk full')
    monkeypatch.setattr(os, 'replace', boom)   # the renames that publish the shards
    with pytest.raises(RuntimeError, match='disk full'):
        run('--input', path, '--out_dir', out)
    assert not out.exists()   # nothing written, not even the directory
    monkeypatch.undo()
    # a complete earlier dataset survives a later run that fails half way through encoding
    run('--input', path, '--out_dir', out)
    before = {f: (out / f).read_bytes() for f in SHARDS}
    calls = []

    def split_then_fail(msgs, frac):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return 'train'
    monkeypatch.setattr(prepare_sft, '_split_of', split_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run('--input', path, '--out_dir', out)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    # what a SIGKILLed run leaves (temp names of a dead pid) is never read and is cleaned up later
    (out / 'train.bin.tmp-999999999').write_bytes(b'partial')
    monkeypatch.undo()
    run('--input', path, '--out_dir', out)
    assert sorted(os.listdir(out)) == sorted(SHARDS)


def test_reader_rejects_corrupt_shards_naming_the_file(tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', chats(10))
    out = tmp_path / 'out'
    with pytest.raises(DataError, match='meta.json'):
        ShardDataset(out)
    run('--input', path, '--out_dir', out, '--val_fraction', 0)
    ds = ShardDataset(out)
    assert len(ds) == 10 and len(ShardDataset(out, 'val')) == 0
    with pytest.raises(IndexError):
        ds[10]
    assert ds[-1][0].tolist() == ds[9][0].tolist()
    data = (out / 'train.bin').read_bytes()
    (out / 'train.bin').write_bytes(data[:-4])
    with pytest.raises(ValueError, match='train.bin.*truncated'):
        ShardDataset(out)
    (out / 'train.bin').write_bytes(data)
    meta = json.loads((out / 'meta.json').read_text())
    meta['format_version'] = 99
    (out / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='meta.json: format_version 99'):
        ShardDataset(out)


def test_show_highlights_trained_tokens_and_prints_the_audit(tmp_path, capsys):
    path = write_jsonl(tmp_path / 'd.jsonl', [{'prompt': 'Say hi', 'completion': 'hi there'}])
    run('--input', path, '--out_dir', tmp_path / 'out', '--show', 1, '--val_fraction', 0)
    out = capsys.readouterr().out
    assert '<|im_start|>assistant\n[hi there<|im_end|>]\n' in out
    for row in ('examples read', 'examples kept', 'truncated', 'tokens', 'trained tokens',
                'length p50/p90/p99/max', 'assistant turns ending in <|im_end|>  1 / 1'):
        assert row in out


def test_gsm8k_slice_shards_match_encode_conversation_with_two_processes(tmp_path, tok, gsm8k_train):
    with open(gsm8k_train, encoding='utf-8') as f:
        lines = [next(f) for _ in range(200)]
    path = tmp_path / 'gsm8k.jsonl'
    path.write_text(''.join(lines), encoding='utf-8')
    run('--input', path, '--out_dir', tmp_path / 'p1', '--format', 'gsm8k')
    meta = run('--input', path, '--out_dir', tmp_path / 'p2', '--num_proc', 2)
    for f in SHARDS[:-1]:
        assert (tmp_path / 'p1' / f).read_bytes() == (tmp_path / 'p2' / f).read_bytes(), f
    assert meta['stats']['kept'] == 200 and meta['stats']['turns_closed'] == 200
    records = load_records(str(path), fmt='gsm8k')
    assert records[0][1]['content'].endswith('#### 72')
    readers = {s: ShardDataset(tmp_path / 'p2', s) for s in ('train', 'val')}
    cursor = {'train': 0, 'val': 0}
    for msgs in records:   # shards keep input order within each split
        split = prepare_sft._split_of(msgs, 0.05)
        ids, labels = readers[split][cursor[split]]
        cursor[split] += 1
        exp_ids, exp_labels = encode_conversation(msgs, tok)
        assert ids.tolist() == exp_ids and labels.tolist() == exp_labels
    assert cursor == {s: len(r) for s, r in readers.items()}


def test_tool_schemas_and_sharegpt_weights_are_kept(tmp_path, tok):
    tools = [{'type': 'function', 'function': {'name': 'f', 'parameters': {}}}]
    recs = [{'tools': json.dumps(tools), 'messages': [{'role': 'user', 'content': 'call f'},
                                                      {'role': 'assistant', 'content': '', 'tool_calls': [
                                                          {'function': {'name': 'f', 'arguments': {}}}]},
                                                      {'role': 'tool', 'content': 'done'},
                                                      {'role': 'assistant', 'content': 'ok'}]},
            {'tools': tools, 'conversations': [{'from': 'human', 'value': 'a'},
                                               {'from': 'gpt', 'value': 'b', 'weight': 0},
                                               {'from': 'human', 'value': 'c'},
                                               {'from': 'gpt', 'value': 'd', 'weight': 1}]}]
    path = write_jsonl(tmp_path / 'd.jsonl', recs)
    first, second = load_records(path)
    assert first[0]['tools'] == tools and second[0]['tools'] == tools
    assert [m.get('train') for m in second] == [None, False, None, True]
    ids, labels = encode_conversation(first, tok)
    assert '# Tools' in tok.decode(ids) and tok.special_tokens['<tool_call>'] in ids
    bad = write_jsonl(tmp_path / 'bad.jsonl', [{'tools': '{nope', 'messages': recs[0]['messages']}])
    with pytest.raises(SystemExit, match=rf'{bad}:1: "tools": not valid JSON'):
        run('--input', bad, '--out_dir', tmp_path / 'o')


def test_out_dir_that_is_a_file_or_lies_under_one_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', chats(5))
    afile = tmp_path / 'afile'
    afile.write_text('keep me')
    for out in (afile, afile / 'sub'):
        with pytest.raises(SystemExit, match=rf'prepare_sft: --out_dir {out}: cannot create the directory'):
            run('--input', path, '--out_dir', out)
    assert afile.read_text() == 'keep me'


def test_a_run_that_keeps_no_example_leaves_no_output_directory(tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', chats(6))
    with pytest.raises(SystemExit, match='no example kept'):
        run('--input', path, '--out_dir', tmp_path / 'a', '--truncation', 'drop', '--max_length', 4)
    untrained = [{'messages': [dict(m, train=False) if m['role'] == 'assistant' else m for m in r['messages']]}
                 for r in chats(6)]
    with pytest.raises(SystemExit, match='no example kept'):
        run('--input', write_jsonl(tmp_path / 'u.jsonl', untrained), '--out_dir', tmp_path / 'b')
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
    (tmp_path / 'c').mkdir()   # a directory the user made stays, empty as it was
    with pytest.raises(SystemExit, match='no example kept'):
        run('--input', path, '--out_dir', tmp_path / 'c', '--truncation', 'drop', '--max_length', 4)
    assert (tmp_path / 'c').is_dir() and not os.listdir(tmp_path / 'c')


def _family_chats(family, n, seed=0):
    from family_tokenizers import random_conversation
    rng = random.Random(seed)
    return [{'messages': random_conversation(rng, family)} for _ in range(n)]


def test_directory_tokenizer_brings_its_chat_format_and_meta_records_it(tmp_path):
    from family_tokenizers import build_family_dir
    d = build_family_dir(tmp_path / 'tok', 'llama3')
    records = _family_chats('llama3', 12)
    path = write_jsonl(tmp_path / 'chat.jsonl', records)
    meta = run('--input', path, '--out_dir', tmp_path / 'out', '--tokenizer', d, '--val_fraction', 0)
    tok = load_tokenizer(d)
    fmt = meta['tokenizer']['chat_format']
    assert meta['chat_template'] == fmt['name'] == 'llama3' and meta['token_dtype'] == 'uint16'
    assert fmt['end_id'] == tok.special_tokens['<|eot_id|>'] and len(fmt['template_sha256']) == 64
    assert meta['stats']['end_of_turn'] == '<|eot_id|>'
    assert meta['stats']['turns_closed'] == meta['stats']['turns'] == sum(
        m['role'] == 'assistant' for r in records for m in r['messages'])
    ds = ShardDataset(tmp_path / 'out', 'train')
    for i, rec in enumerate(load_records(path)):
        ids, labels = encode_conversation(rec, tok, chat_template='llama3')
        assert ds[i][0].tolist() == ids and ds[i][1].tolist() == labels


def test_general_path_refusal_names_file_line_and_turn_or_is_skipped(tmp_path):
    from family_tokenizers import build_family_dir
    d = build_family_dir(tmp_path / 'tok', 'mistral')   # the official v0.3 template
    ok = {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]}
    moved = {'messages': [{'role': 'system', 'content': 'Be brief.'}] + ok['messages']}
    path = write_jsonl(tmp_path / 'chat.jsonl', [ok, moved])
    with pytest.raises(SystemExit, match=r'chat\.jsonl:2: chat template .* is not prefix-consistent at '
                                         r'assistant turn 1 \(message 2\)'):
        run('--input', path, '--out_dir', tmp_path / 'out', '--tokenizer', d, '--chat_template', 'hf')
    assert not (tmp_path / 'out').exists()
    meta = run('--input', path, '--out_dir', tmp_path / 'out', '--tokenizer', d, '--chat_template', 'hf',
               '--skip_invalid', '--val_fraction', 0)
    assert meta['stats']['invalid'] == 1 and meta['stats']['kept'] == 1
    assert meta['tokenizer']['chat_format']['template'].startswith('{%- if messages[0]["role"] == "system" %}')
    # the built-in format renders it (mistral-common's placement of the system prompt)
    assert run('--input', path, '--out_dir', tmp_path / 'out2', '--tokenizer', d)['stats']['kept'] == 2


def test_directory_without_a_tokenizer_or_a_missing_format_token_fails_before_any_work(tmp_path):
    (tmp_path / 'empty').mkdir()
    path = write_jsonl(tmp_path / 'chat.jsonl', chats(2))
    with pytest.raises(SystemExit, match=r'empty: no tokenizer\.json'):
        run('--input', path, '--out_dir', tmp_path / 'out', '--tokenizer', tmp_path / 'empty')
    with pytest.raises(SystemExit, match=r"'llama3' needs the tokens <\|begin_of_text\|>"):
        run('--input', path, '--out_dir', tmp_path / 'out', '--chat_template', 'llama3')
    assert not (tmp_path / 'out').exists()
