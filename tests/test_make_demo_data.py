import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'data'))
import make_demo_data as mdd  # noqa: E402


def run(tmp_path, *args):
    subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'make_demo_data.py'),
                    '--out_dir', str(tmp_path), *args], check=True, capture_output=True)
    read = lambda n: [json.loads(l) for l in open(tmp_path / n, encoding='utf-8')]
    return read('train.jsonl'), read('test.jsonl')


def test_same_seed_gives_identical_files(tmp_path):
    a = run(tmp_path / 'a', '--n_train', '200', '--n_test', '50', '--seed', '3')
    b = run(tmp_path / 'b', '--n_train', '200', '--n_test', '50', '--seed', '3')
    c = run(tmp_path / 'c', '--n_train', '200', '--n_test', '50', '--seed', '4')
    assert a == b and a != c
    assert len(a[0]) == 200 and len(a[1]) == 50


def test_test_prompts_never_appear_in_train(tmp_path):
    train, test = run(tmp_path, '--n_train', '2000', '--n_test', '300')
    assert not {mdd.prompt_key(e) for e in train} & {mdd.prompt_key(e) for e in test}


def test_records_are_valid_chats_whose_reference_is_the_last_reply(tmp_path):
    train, test = run(tmp_path, '--n_train', '500', '--n_test', '100')
    tasks = set()
    for ex in train + test:
        msgs = ex['messages']
        assert msgs[-1]['role'] == 'assistant' and msgs[-1]['content'] == ex['reference']
        roles = [m['role'] for m in msgs if m['role'] != 'system']
        assert roles == ['user', 'assistant'] * (len(roles) // 2)
        assert all(isinstance(m['content'], str) and m['content'] for m in msgs)
        tasks.add(ex['task'])
    assert tasks == {'add', 'sub', 'count', 'reverse', 'sort', 'convert', 'followup'}


@pytest.mark.parametrize('system,value,expected', [
    (None, 7, '7'), (mdd.SYS_WORDS, 7, 'seven'), (mdd.SYS_JSON, 7, '{"answer": 7}'),
    ('Be brief.', 12, '12')])
def test_system_prompt_changes_the_answer_format(system, value, expected):
    assert mdd.number_reply(value, system) == expected


def test_answers_are_correct():
    import random
    rng = random.Random(0)
    for _ in range(300):
        ex = mdd.make_example(rng)
        q = ex['messages'][-2]['content']
        if ex['task'] == 'sort':
            xs = q.split(': ')[1].split()
            assert ex['reference'] == ' '.join(sorted(xs))
        if ex['task'] == 'add' and ex['messages'][0]['role'] == 'user':
            nums = [int(t) for t in q.replace('?', ' ').replace('.', ' ').split() if t.isdigit()]
            assert ex['reference'] == str(sum(nums))


# ---------------------------------------------------------------------- the demo tokenizer
def test_demo_tokenizer_is_deterministic_and_encodes_any_text_losslessly(tmp_path):
    from tokenizer import load_tokenizer
    run(tmp_path / 'a', '--n_train', '300', '--n_test', '10', '--vocab_size', '300')
    run(tmp_path / 'b', '--n_train', '300', '--n_test', '10', '--vocab_size', '300')
    blob = lambda d: (d / 'tokenizer' / 'tokenizer.json').read_bytes()
    assert blob(tmp_path / 'a') == blob(tmp_path / 'b')
    tok = load_tokenizer(str(tmp_path / 'a' / 'tokenizer'))
    assert tok.vocab_size == 300
    assert [tok.special_tokens[t] for t in mdd.SPECIALS] == [297, 298, 299]
    # byte-level: text never seen in training (accents, CJK, emoji) still round-trips exactly
    for text in ('What is 12 + 30?', 'Ünïcödé 漢字 🙂 <|im_end|> as text', ' \n\t x'):
        ids = tok.encode(text)
        assert all(0 <= i < 297 for i in ids) and tok.decode(ids) == text


def test_demo_tokenizer_renders_chatml_with_its_own_special_ids(tmp_path):
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    run(tmp_path, '--n_train', '300', '--n_test', '10')
    tok = load_tokenizer(str(tmp_path / 'tokenizer'))
    ids, labels = encode_conversation([{'role': 'user', 'content': 'What is 3 + 4?'},
                                       {'role': 'assistant', 'content': '7'}], tok)
    im_start, im_end = tok.special_tokens['<|im_start|>'], tok.special_tokens['<|im_end|>']
    assert ids.count(im_start) == 2 and ids.count(im_end) == 2
    trained = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(trained) == '7<|im_end|>'
    # merges learned from the data: its phrases take fewer tokens than bytes
    text = 'Sort these numbers from small to large: 3 1 2'
    assert len(tok.encode(text)) < 0.75 * len(text.encode())


def test_too_small_tokenizer_vocab_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'make_demo_data.py'),
                           '--out_dir', str(tmp_path), '--n_train', '10', '--vocab_size', '100'],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and '--vocab_size must be >= 259' in proc.stderr
    assert not (tmp_path / 'tokenizer').exists()
