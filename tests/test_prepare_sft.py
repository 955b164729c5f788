import json
import os
import random

import numpy as np
import pytest

import prepare_sft
from chat_format import encode_conversation
from chat_records import DataError, load_records
from prepare_sft import main
from sft_data import ShardDataset
from tokenizer import load_tokenizer

SHARDS = ('train.bin', 'train.mask', 'train.idx', 'train.src', 'val.bin', 'val.mask', 'val.idx', 'val.src',
          'meta.json')


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


def test_conversations_that_differ_only_in_unicode_normalization_land_in_the_same_split():
    """The tokenizer NFC-normalizes: an NFD copy has the same ids, and in the other split it would
    leak a training example into validation."""
    import unicodedata
    for i in range(200):
        nfc = [{'role': 'user', 'content': f'Café n°{i}: déjà vu?'}, {'role': 'assistant', 'content': f'Überall {i}'}]
        nfd = [{**m, 'content': unicodedata.normalize('NFD', m['content'])} for m in nfc]
        assert nfd != nfc and prepare_sft._split_of(nfc, 0.5) == prepare_sft._split_of(nfd, 0.5), i


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


# ---------------------------------------------------------------- sources, mixtures, dedup, streaming

def test_weighted_sources_record_each_example_source_and_per_source_counts(tmp_path, capsys):
    a = write_jsonl(tmp_path / 'chat.jsonl', chats(40, seed=1))
    b = write_jsonl(tmp_path / 'math.jsonl', chats(10, seed=2))
    meta = run('--input', f'{a}:0.7', f'{b}:0.3', '--out_dir', tmp_path / 'out', '--val_fraction', 0.2,
               '--max_length', 4096)
    assert meta['mixture_by'] == 'examples'
    chat, math_ = meta['sources']
    assert (chat['name'], chat['files'], chat['weight']) == (a, [a], 0.7)
    assert (math_['name'], math_['weight']) == (b, 0.3)
    for split in ('train', 'val'):
        ds = ShardDataset(tmp_path / 'out', split)
        counts = np.bincount(ds.sources, minlength=2).tolist()
        assert counts == [chat['examples'][split], math_['examples'][split]]
    assert chat['examples']['train'] + chat['examples']['val'] == 40
    # the realized proportion is the training sampler's: 70/30 of the examples of an epoch
    assert (chat['realized_examples'], math_['realized_examples']) == pytest.approx((0.7, 0.3), abs=0.01)
    assert math_['passes'] > 1 > chat['passes']   # the small source is upsampled
    out = capsys.readouterr().out
    assert 'sources (weighted, sampled by examples' in out
    assert f'{b}  weight 0.300, 10 examples' in out and 'realized 30.' in out
    # unweighted sources: concatenated, the same shards as one file holding both
    both = write_jsonl(tmp_path / 'both.jsonl', chats(40, seed=1) + chats(10, seed=2))
    run('--input', a, b, '--out_dir', tmp_path / 'two', '--max_length', 4096)
    run('--input', both, '--out_dir', tmp_path / 'one', '--max_length', 4096)
    for f in ('train.bin', 'train.mask', 'train.idx', 'val.bin'):
        assert (tmp_path / 'two' / f).read_bytes() == (tmp_path / 'one' / f).read_bytes()
    assert json.loads((tmp_path / 'two' / 'meta.json').read_text())['mixture_by'] is None


def test_weights_by_trained_tokens_and_globs_as_one_source(tmp_path):
    d = tmp_path / 'parts'
    d.mkdir()
    for k in range(3):
        write_jsonl(d / f'p{k}.jsonl', chats(8, seed=10 + k))
    small = write_jsonl(tmp_path / 'small.jsonl', chats(5, seed=3))
    meta = run('--input', f'{d}/p*.jsonl:1', f'{small}:1', '--out_dir', tmp_path / 'out', '--mix_by', 'tokens',
               '--val_fraction', 0, '--max_length', 4096)
    parts, sm = meta['sources']
    assert parts['name'] == f'{d}/p*.jsonl' and len(parts['files']) == 3 and parts['examples']['train'] == 24
    assert meta['mixture_by'] == 'tokens'
    assert (parts['realized_trained_tokens'], sm['realized_trained_tokens']) == pytest.approx((0.5, 0.5), abs=0.01)


@pytest.mark.parametrize('spec, error', [
    ('{a}:0', "the weight '0' must be a positive number"),
    ('{a}:-0.5', "the weight '-0.5' must be a positive number"),
    ('{a}:nan', "the weight 'nan' must be a positive number"),
    ('{missing}:0.5', 'missing.jsonl: no such file'),
    ('{text}:0.5', r"text.parquet: no columns of a known record format"),
    ('{a}:0.5 {a}:0.5', 'in two sources'),
    ('{a}:0.5 {b}', r'give every source a weight or none \(.*b.jsonl has none\)'),
])
def test_bad_mixture_input_is_a_clear_error_before_any_work(tmp_path, monkeypatch, spec, error):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    paths = {'a': write_jsonl(tmp_path / 'a.jsonl', chats(3)), 'b': write_jsonl(tmp_path / 'b.jsonl', chats(3)),
             'missing': str(tmp_path / 'missing.jsonl'), 'text': str(tmp_path / 'text.parquet')}
    pq.write_table(pa.Table.from_pylist([{'text': 'hello'}]), paths['text'])
    monkeypatch.setattr(prepare_sft, 'load_tokenizer', lambda *a: pytest.fail('work started'))
    with pytest.raises(SystemExit, match=error):
        run('--input', *spec.format(**paths).split(), '--out_dir', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_a_colon_in_a_path_is_not_a_weight(tmp_path):
    path = write_jsonl(tmp_path / 'v1:final.jsonl', chats(3))
    named = write_jsonl(tmp_path / 'odd.jsonl:2', chats(4))    # a file whose own name ends like a weight
    meta = run('--input', path, named, '--out_dir', tmp_path / 'out', '--val_fraction', 0)
    assert [s['name'] for s in meta['sources']] == [path, named] and meta['stats']['kept'] == 7
    assert meta['mixture_by'] is None


@pytest.mark.parametrize('num_proc', [1, 2])
def test_dedup_keeps_the_first_of_identical_conversations_and_counts_per_source(tmp_path, num_proc):
    recs = chats(30)
    a = write_jsonl(tmp_path / 'a.jsonl', recs + recs[:5])                     # 5 exact repeats
    variants = [{'messages': [dict(m, content='  ' + m['content'] + '\n') for m in r['messages']]}
                for r in recs[10:14]]                                          # same after normalization
    b = write_jsonl(tmp_path / 'b.jsonl', variants + chats(6, seed=9))
    meta = run('--input', a, b, '--out_dir', tmp_path / 'out', '--dedup', '--num_proc', num_proc,
               '--val_fraction', 0.3, '--max_length', 4096)
    st, (sa, sb) = meta['stats'], meta['sources']
    assert st['duplicates'] == 9 and (sa['duplicates'], sb['duplicates']) == (5, 4)
    assert st['read'] == 45 and st['kept'] == 36
    assert (sa['examples']['train'] + sa['examples']['val'], sb['examples']['train'] + sb['examples']['val']) == (30, 6)
    kept = set()
    for split in ('train', 'val'):
        ds = ShardDataset(tmp_path / 'out', split)
        kept |= {tuple(ds[i][0]) for i in range(len(ds))}
    assert len(kept) == 36   # nothing identical left
    undeduped = run('--input', a, b, '--out_dir', tmp_path / 'raw', '--max_length', 4096)
    assert undeduped['stats']['kept'] == 45 and undeduped['stats']['duplicates'] is None


def test_length_percentiles_from_the_histogram_equal_numpy_on_the_lengths():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101, 5000):
        lengths = rng.integers(1, 300, n)
        hist = np.bincount(lengths, minlength=301)
        for q in (50, 90, 99, 0, 100, 33.3):
            assert prepare_sft.percentile(hist, q) == int(np.percentile(lengths, q)), (n, q)
    assert prepare_sft.percentile(np.zeros(5, dtype=np.int64), 50) == 0


PEAK_RSS = '''
import resource, sys
sys.path.insert(0, {root!r})
import prepare_sft
prepare_sft.main(sys.argv[1:])
print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
'''


@pytest.mark.slow
def test_parquet_much_larger_than_the_memory_it_uses_prepares_in_bounded_memory(tmp_path):
    """Peak RSS of prepare_sft on Parquet files of 200 and 20,000 rows (~65 MB of text, far more as
    python objects): the big file is over twice the memory its 19,800 extra rows add (records,
    encoding, split and shards all stream; reading it whole would add several times its size)."""
    import subprocess
    import sys
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    rng = random.Random(0)
    words = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron'.split()

    def write(n, path):
        text = 0
        with pq.ParquetWriter(path, pa.schema([('messages', pa.list_(pa.struct(
                [('role', pa.string()), ('content', pa.string())])))])) as w:
            for lo in range(0, n, 1000):
                rows = [{'messages': [{'role': 'user', 'content': ' '.join(rng.choices(words, k=300))},
                                      {'role': 'assistant', 'content': ' '.join(rng.choices(words, k=300))}]}
                        for _ in range(min(1000, n - lo))]
                text += sum(len(m['content']) for r in rows for m in r['messages'])
                w.write_table(pa.Table.from_pylist(rows, schema=w.schema), row_group_size=1000)
        return text

    script = tmp_path / 'peak.py'
    script.write_text(PEAK_RSS.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    peak, text = {}, {}
    for n in (200, 20000):
        path = tmp_path / f'd{n}.parquet'
        text[n] = write(n, path)
        proc = subprocess.run([sys.executable, str(script), '--input', str(path), '--out_dir', str(tmp_path / f'o{n}'),
                               '--max_length', '4096'], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak[n] = int(proc.stdout.split('peak_rss_kb')[-1]) * 1024
        assert f'examples kept                         {n} ' in proc.stdout
    assert text[20000] > 60e6
    print(f"peak RSS {peak}, text {text}")
    assert text[20000] > 2 * (peak[20000] - peak[200]), (peak, text)
