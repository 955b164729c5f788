"""Tests for gen_eval.py: the held-out set, batched greedy replies, scoring."""
import json

import pytest
import torch

from chat_records import DataError
from gen_eval import (default_max_new_tokens, generate_replies, is_correct, load_eval_records, metrics,
                      score_replies)
from model_builder import ConfigurableGPT
from model_config import ModelArchitectureConfig
from tokenizer import load_tokenizer

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


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp('gen') / 'test.jsonl'
    p.write_text(''.join(json.dumps(c) + '\n' for c in CONVS))
    return str(p)


def test_batched_greedy_generation_matches_one_by_one(data):
    torch.manual_seed(0)
    model = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny')).eval()
    tok = load_tokenizer('qwen3')
    recs = load_eval_records(data)
    batched = generate_replies(model, tok, recs, 'chatml', 5, batch_size=3, device='cpu')
    single = [generate_replies(model, tok, [r], 'chatml', 5, 1, 'cpu')[0] for r in recs]
    assert batched == single
    with pytest.raises(DataError, match='max_new_tokens'):
        generate_replies(model, tok, recs, 'chatml', model.config.block_size, 1, 'cpu')


def test_scores_are_counts_that_sum_over_slices_to_the_whole(data):
    recs = load_eval_records(data)
    replies = [('4', True, False), ('{"answer":  6}', False, False), ('3 2 1', True, False)]
    whole = score_replies(recs, replies)
    assert (whole['n'], whole['ended'], whole['cut'], whole['with_reference'], whole['correct']) == (3, 2, 0, 2, 2)
    assert whole['correct_each'] == [True, True, None]   # whitespace-normalized exact match
    m = metrics(whole)
    assert m == {'format_compliance': pytest.approx(2 / 3), 'cut_off': 0.0, 'accuracy': 1.0,
                 'accuracy_per_task': {'add': 1.0, 'followup': 1.0}}
    # two ranks, each a slice: summing their counts gives the same metrics
    parts = [score_replies(recs[r::2], replies[r::2]) for r in range(2)]
    summed = {k: sum(p[k] for p in parts) for k in ('n', 'ended', 'cut', 'with_reference', 'correct')}
    summed['per_task'] = {t: [sum(p['per_task'].get(t, [0, 0])[i] for p in parts) for i in (0, 1)]
                          for t in whole['per_task']}
    assert metrics(summed) == m
    assert metrics(score_replies(recs[2:], replies[2:]))['accuracy'] is None
    # a reply cut off by max_new_tokens is wrong even when its text matches: it has no final answer
    cut = score_replies(recs[:1], [('4', False, True)])
    assert (cut['cut'], cut['correct'], cut['correct_each']) == (1, 0, [False])


def test_default_reply_limit_fits_the_longest_held_out_reply():
    tok = load_tokenizer('qwen3')
    recs = [{'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'word ' * n}]}
            for n in (3, 120, 40)]
    assert default_max_new_tokens(recs, tok, 2048) == len(tok.encode('word ' * 120)) + 16
    assert default_max_new_tokens(recs, tok, 128) == 64   # at most half the block


def test_gsm8k_reference_is_the_number_after_hashes(tmp_path):
    p = tmp_path / 'gsm.jsonl'
    p.write_text(json.dumps({'question': 'q?', 'answer': 'so 1,000 + 234 = 1234\n#### 1,234'}) + '\n')
    (rec,) = load_eval_records(str(p))
    assert rec['reference'] == '1,234' and rec['numeric']
    assert is_correct('It is 1234 apples. The answer is 1,234', rec['reference'], True)
    assert not is_correct('1234 then 5', rec['reference'], True)
    assert not is_correct('no number', rec['reference'], True)
    assert is_correct(' 3  2 1\n', '3 2 1', False)


def test_bad_input_names_file_and_line(tmp_path):
    p = tmp_path / 'bad.jsonl'
    p.write_text(json.dumps(CONVS[0]) + '\n{oops\n')
    with pytest.raises(DataError, match=r'bad.jsonl:2'):
        load_eval_records(str(p))
    p.write_text(json.dumps({'question': 'q', 'answer': 'no hashes'}) + '\n')
    with pytest.raises(DataError, match=r'bad.jsonl:1.*####'):
        load_eval_records(str(p))
    with pytest.raises(DataError, match='missing.jsonl: cannot read'):
        load_eval_records(str(tmp_path / 'missing.jsonl'))
