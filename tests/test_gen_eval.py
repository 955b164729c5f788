"""Tests for gen_eval.py: the held-out set, batched greedy replies, scoring."""
import json

import pytest
import torch

from chat_records import DataError
from gen_eval import (default_max_new_tokens, fsdp_unsharded, generate_replies, is_correct, load_eval_records,
                      load_held_out, metrics, score_replies, sharded_eval)
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


def test_a_qwen3_reply_is_scored_after_its_think_block(tmp_path):
    """Qwen3 trains every reply as '<think>\\n\\n</think>\\n\\n' + answer: a model that emits exactly
    what it was trained on must score as correct, not be compared with the think block in front."""
    from chat_format import get_format
    from family_tokenizers import build_family_dir
    tok = load_tokenizer(build_family_dir(str(tmp_path / 'q'), 'qwen3'))
    fmt = get_format('qwen3', tok)
    rec = {'messages': [{'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': 'four'}],
           'reference': 'four', 'numeric': False, 'task': 'add'}
    ids, labels = fmt.encode(rec['messages'])
    trained = [t for t, label in zip(ids, labels) if label != -100]   # the reply training teaches

    class Perfect:
        config = ModelArchitectureConfig.from_preset("tiny", block_size=256)

        def generate(self, prompts, max_new_tokens, temperature, stop_ids):
            return [trained for _ in prompts]
    replies = generate_replies(Perfect(), tok, [rec], fmt, 32, 1, progress=False)
    assert tok.decode(trained).startswith('<think>') and replies == [('four', True, False)]


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


def test_generation_on_an_fsdp_sharded_model_gives_the_plain_models_tokens(tmp_path):
    """fsdp_unsharded gathers every parameter group for generate() (which calls the blocks step by
    step, outside FSDP's forward hooks), then shards them again for training."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny'))
    with torch.no_grad():   # large random weights: varied replies, not one repeated token
        for p in model.parameters():
            p.normal_(0, 0.3)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    expected = model.generate(prompts, max_new_tokens=8, temperature=0.0)
    assert len({tuple(r) for r in expected}) == 3 and len(set(expected[0])) > 2
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        before = {k: type(v) for k, v in model.state_dict().items()}
        with fsdp_unsharded(model):
            assert model.generate(prompts, max_new_tokens=8, temperature=0.0) == expected
        assert {k: type(v) for k, v in model.state_dict().items()} == before   # sharded again
        _, loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
        loss.backward()   # and FSDP's own forward/backward still work
    finally:
        dist.destroy_process_group()


def test_held_out_set_without_references_or_with_another_tokenizer_is_refused(tmp_path, data):
    no_ref = tmp_path / 'noref.jsonl'
    no_ref.write_text(json.dumps({'messages': CONVS[2]['messages']}) + '\n')
    with pytest.raises(DataError, match='noref.jsonl: no conversation has a `reference`'):
        load_held_out(str(no_ref), {'name': 'qwen3'}, 256)
    with pytest.raises(DataError, match='is not the one the data was prepared with'):
        load_held_out(data, {'name': 'qwen3', 'hash': 'f' * 64}, 256)
    held = load_held_out(data, {'name': 'qwen3', 'hash': load_tokenizer('qwen3').hash}, 256, limit=2)
    assert len(held.records) == 2 and held.tasks == ['add', 'followup'] and held.max_new_tokens > 0
    assert held.chat_template.name == 'chatml'   # a data dir without a recorded format: ChatML


def test_one_process_sharded_eval_scores_like_the_offline_path(data):
    torch.manual_seed(0)
    model = ConfigurableGPT(ModelArchitectureConfig.from_preset('tiny')).eval()
    held = load_held_out(data, {'name': 'qwen3'}, 256, max_new_tokens=5)
    offline = metrics(score_replies(held.records, generate_replies(model, held.tok, held.records, 'chatml', 5, 2)))
    got = sharded_eval(model, held, batch_size=2)
    assert {k: got[k] for k in offline} == offline
    assert got['sample']['prompt'] == 'What is 2 + 2?' and got['with_reference'] == 2
    assert model.training   # back in training mode for the next step


@pytest.mark.parametrize('message, error', [
    ({'role': 'asistant', 'content': '4'}, r"bad.jsonl:1: messages\[1\].role: unknown role 'asistant'"),
    ({'role': 'bot', 'content': '4'}, r"bad.jsonl:1: messages\[1\].role: unknown role 'bot'"),
    ({'role': 'assistant', 'content': 5}, r'bad.jsonl:1: messages\[1\].content: must be a string, got int'),
])
def test_records_training_would_refuse_are_refused_with_the_same_error(tmp_path, message, error):
    p = tmp_path / 'bad.jsonl'
    p.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'q'}, message], 'reference': '4'}) + '\n')
    with pytest.raises(DataError, match=error):
        load_eval_records(str(p))


def test_utf8_bom_is_read_as_prepare_sft_reads_it(tmp_path, data):
    p = tmp_path / 'bom.jsonl'
    p.write_bytes(b'\xef\xbb\xbf' + open(data, 'rb').read())
    assert load_eval_records(str(p)) == load_eval_records(data)


def test_a_checkpoint_given_as_the_data_file_is_named_as_binary(tmp_path):
    p = tmp_path / 'ckpt.pt'
    torch.save({'model': {'w': torch.zeros(3)}}, p)
    with pytest.raises(DataError, match=r'ckpt.pt: not a JSONL/JSON text file \(binary'):
        load_eval_records(str(p))
