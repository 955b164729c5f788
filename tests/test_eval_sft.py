import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import save_checkpoint  # noqa: E402
from model_builder import ConfigurableGPT  # noqa: E402
from model_config import ModelArchitectureConfig  # noqa: E402
from chat_format import encode_conversation  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
import eval_sft  # noqa: E402

CONVS = [
    {'messages': [{'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': '4'}],
     'reference': '4', 'task': 'add'},
    {'messages': [{'role': 'system', 'content': 'Reply with JSON.'},
                  {'role': 'user', 'content': 'What is 1 + 2?'}, {'role': 'assistant', 'content': '{"answer": 3}'},
                  {'role': 'user', 'content': 'Now double it.'}, {'role': 'assistant', 'content': '{"answer": 6}'}],
     'reference': '{"answer": 6}', 'task': 'followup'},
    {'messages': [{'role': 'user', 'content': 'Reverse the list: 1 2 3'},
                  {'role': 'assistant', 'content': '3 2 1'}], 'task': 'reverse'},
]


def tiny_checkpoint(path, seed):
    torch.manual_seed(seed)
    cfg = ModelArchitectureConfig.from_preset('tiny')
    model = ConfigurableGPT(cfg)
    save_checkpoint(path, {'model': model.state_dict(), 'model_args': cfg.to_dict(), 'iter_num': 0,
                           'config': {}, 'tokenizer': load_tokenizer('qwen3').meta()})
    return model


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('eval')
    models = [tiny_checkpoint(d / f'm{s}.pt', s) for s in (0, 1)]
    data = d / 'test.jsonl'
    data.write_text(''.join(json.dumps(c) + '\n' for c in CONVS))
    return d, models, data


def test_loss_is_token_weighted_over_the_file_with_training_masks(setup):
    d, (model, _), data = setup
    model.eval()
    tok = load_tokenizer('qwen3')
    total = count = 0
    with torch.no_grad():
        for c in CONVS:  # one conversation at a time: no padding can leak into the number
            ids, labels = encode_conversation(c['messages'], tok)
            _, loss = model(torch.tensor([ids]), labels=torch.tensor([labels]), reduction='sum')
            total += float(loss)
            count += sum(l != -100 for l in labels[1:])
    recs = eval_sft.load_eval_records(str(data))
    s, n, _ = eval_sft.masked_loss(model, tok, recs, 'chatml', batch_size=3, device='cpu')
    assert n == count and s / n == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_cli_writes_json_and_one_table_row_per_checkpoint(setup, capsys):
    d, _, data = setup
    out = d / 'eval.json'
    eval_sft.main([str(data), str(d / 'm0.pt'), str(d / 'm1.pt'), '--labels', 'base', 'sft',
                   '--out', str(out), '--max_new_tokens', '4', '--batch_size', '2'])
    table = capsys.readouterr().out
    assert '| base |' in table and '| sft |' in table
    rep = json.loads(out.read_text())
    assert [r['label'] for r in rep['results']] == ['base', 'sft']
    for r in rep['results']:
        assert r['n'] == 3 and r['n_with_reference'] == 2
        assert math.isclose(r['perplexity'], math.exp(r['val_loss']), rel_tol=1e-6)
        assert 0 <= r['format_compliance'] <= 1 and 0 <= r['accuracy'] <= 1


def test_batched_greedy_generation_matches_one_by_one(setup):
    _, (model, _), _ = setup
    tok = load_tokenizer('qwen3')
    recs = eval_sft.load_eval_records(os.path.join(setup[0], 'test.jsonl'))
    batched = eval_sft.generate_replies(model, tok, recs, 'chatml', 5, batch_size=3, device='cpu')
    single = [eval_sft.generate_replies(model, tok, [r], 'chatml', 5, 1, 'cpu')[0] for r in recs]
    assert batched == single


def test_compliance_and_accuracy_scoring(monkeypatch, setup):
    d, _, data = setup
    fake = [('4', True, False), ('{"answer":  6}', False, False), ('3 2 1', True, False)]
    monkeypatch.setattr(eval_sft, 'generate_replies', lambda *a, **k: fake)

    class A:
        device, tokenizer, batch_size, max_new_tokens, n_samples = 'cpu', None, 8, 4, 2
    r = eval_sft.evaluate(str(d / 'm0.pt'), eval_sft.load_eval_records(str(data)), A, 'x')
    assert r['format_compliance'] == pytest.approx(2 / 3)
    assert r['accuracy'] == 1.0  # whitespace-normalized exact match
    assert r['accuracy_per_task'] == {'add': 1.0, 'followup': 1.0}
    assert r['cut_off'] == 0 and r['max_new_tokens'] == 4


def test_replies_cut_off_by_the_limit_are_counted_scored_wrong_and_warned_about(monkeypatch, setup,
                                                                                tmp_path, capsys):
    d, _, _ = setup
    gsm = tmp_path / 'gsm.jsonl'
    gsm.write_text(''.join(json.dumps({'question': f'q{i}?', 'answer': '2 + 3 = 5\n#### 5'}) + '\n'
                           for i in range(4)))
    # three replies stopped by the limit mid-reasoning (their last number happens to be the answer)
    fake = [('2 + 3 = 5', False, True)] * 3 + [('2 + 3 = 5 #### 5', True, False)]
    monkeypatch.setattr(eval_sft, 'generate_replies', lambda *a, **k: fake)

    class A:
        device, tokenizer, batch_size, max_new_tokens, n_samples = 'cpu', None, 8, 4, 4
    r = eval_sft.evaluate(str(d / 'm0.pt'), eval_sft.load_eval_records(str(gsm)), A, 'x')
    assert r['cut_off'] == 0.75 and r['accuracy'] == 0.25 and r['format_compliance'] == 0.25
    assert 'warning: 3 of 4 replies reached --max_new_tokens 4' in capsys.readouterr().err
    assert '| cut off |' in eval_sft.markdown_table([r]) and '75.0%' in eval_sft.markdown_table([r])


def test_default_reply_limit_fits_the_longest_held_out_reply(setup):
    from tokenizer import load_tokenizer
    tok = load_tokenizer('qwen3')
    recs = [{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'word ' * n}]}
            for n in (3, 120, 40)]
    assert eval_sft.default_max_new_tokens(recs, tok, 2048) == len(tok.encode('word ' * 120)) + 16
    assert eval_sft.default_max_new_tokens(recs, tok, 128) == 64   # at most half the block


def test_gsm8k_reference_is_the_number_after_hashes(tmp_path):
    p = tmp_path / 'gsm.jsonl'
    p.write_text(json.dumps({'question': 'q?', 'answer': 'so 1,000 + 234 = 1234\n#### 1,234'}) + '\n')
    (rec,) = eval_sft.load_eval_records(str(p))
    assert rec['reference'] == '1,234' and rec['numeric']
    assert eval_sft.is_correct('It is 1234 apples. The answer is 1,234', rec['reference'], True)
    assert not eval_sft.is_correct('1234 then 5', rec['reference'], True)
    assert not eval_sft.is_correct('no number', rec['reference'], True)
    assert eval_sft.is_correct(' 3  2 1\n', '3 2 1', False)


def test_bad_input_names_file_and_line(tmp_path):
    p = tmp_path / 'bad.jsonl'
    p.write_text(json.dumps(CONVS[0]) + '\n{oops\n')
    with pytest.raises(SystemExit, match=r'bad.jsonl:2'):
        eval_sft.load_eval_records(str(p))
    p.write_text(json.dumps({'question': 'q', 'answer': 'no hashes'}) + '\n')
    with pytest.raises(SystemExit, match=r'bad.jsonl:1.*####'):
        eval_sft.load_eval_records(str(p))
