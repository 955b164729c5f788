import json
import os

import pytest

from family_tokenizers import build_family_dir, hf_tokenizer
from tokenizer import (QWEN3_SPECIALS, HFChatTokenizer, TiktokenChatTokenizer, load_tokenizer,
                       to_hf_tokenizer)

GSM8K = '/work/shared/data/gsm8k/train.jsonl'


@pytest.fixture(scope='module')
def tok():
    return load_tokenizer('qwen3')


@pytest.fixture(scope='module')
def converted_dir(tok, tmp_path_factory):
    """The Qwen ranks as a Hugging Face directory (TikTokenConverter: complete merge list)."""
    d = tmp_path_factory.mktemp('qwen_hf')
    to_hf_tokenizer(tok, chat_template='{{ bos_token }}').save_pretrained(d)
    return str(d)


def test_known_ids(tok):
    assert tok.encode('Hello world') == [9707, 1879]
    assert tok.encode('\n\n') == [271]


def test_special_tokens_have_qwen3_ids(tok):
    assert len(QWEN3_SPECIALS) == 26
    for k, name in enumerate(QWEN3_SPECIALS):
        assert tok.special_tokens[name] == 151643 + k
    assert (tok.pad_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert (tok.think_start_id, tok.think_end_id) == (151667, 151668)
    assert tok.eos_id == 151645 and tok.stop_ids == (151645, 151643) and tok.bos_id is None
    assert tok.vocab_size == 151669
    assert len(tok.hash) == 64 and tok.hash == load_tokenizer('qwen3').hash


def test_control_strings_in_text_stay_text(tok):
    for s in QWEN3_SPECIALS:
        ids = tok.encode(s)
        assert max(ids) < 151643 and tok.decode(ids) == s


def test_directory_without_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / 'tokenizer_config.json').write_text('{}')
    with pytest.raises(ValueError, match=r'no tokenizer\.json \(found: tokenizer_config\.json\)'):
        load_tokenizer(str(tmp_path))
    (tmp_path / 'tokenizer.json').write_text('{"model": ')
    with pytest.raises(ValueError, match=r'tokenizer\.json: not a readable tokenizer\.json'):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        load_tokenizer('nope')


def test_directory_reads_named_tokens_template_stop_ids_and_model_type(tmp_path):
    d = build_family_dir(tmp_path / 'llama', 'llama3')
    t = load_tokenizer(d)
    sp = t.special_tokens
    assert (t.bos_id, t.eos_id) == (sp['<|begin_of_text|>'], sp['<|eot_id|>'])
    assert t.pad_id == t.eos_id   # no pad_token declared: padding is never trained
    assert t.stop_ids == (sp['<|end_of_text|>'], sp['<|eom_id|>'], sp['<|eot_id|>'])
    assert 'Cutting Knowledge Date' in t.chat_template and t.model_type == 'llama'
    assert t.vocab_size == max(sp.values()) + 1
    # chat_template.jinja wins over tokenizer_config.json, as in transformers
    (tmp_path / 'llama' / 'chat_template.jinja').write_text('{{ messages[0].content }}')
    assert load_tokenizer(d + '/').chat_template == '{{ messages[0].content }}'


@pytest.mark.slow   # converting 151k ranks takes ~8 s
def test_converted_byte_level_directory_runs_on_tiktoken_with_the_same_ids(tok, converted_dir):
    local = load_tokenizer(converted_dir)
    assert isinstance(local, TiktokenChatTokenizer)
    assert local.special_tokens == tok.special_tokens and local.vocab_size == tok.vocab_size
    assert local.text_tokens == tok.text_tokens
    backend = local.backend
    with open(GSM8K) as f:
        texts = [json.loads(next(f))['answer'] for _ in range(300)]
    texts += ['cafe\u0301 <|im_end|> <think>', ' \n\n  x\r\n\t', '😀' * 5, '']
    for text in texts:
        assert local.encode(text) == tok.encode(text)
        if '<' not in text:   # the Hugging Face backend matches added tokens; plain text only
            assert local.encode(text) == backend.encode(text, add_special_tokens=False).ids


def test_trained_bpe_directory_runs_on_the_tokenizers_library_like_hf(tmp_path):
    for family in ('qwen2.5', 'mistral'):
        d = build_family_dir(tmp_path / family, family)
        local, hf = load_tokenizer(d), hf_tokenizer(d)
        assert isinstance(local, HFChatTokenizer)   # one merge per token: tiktoken could differ
        for text in ('The cat sat.', ' leading space', 'naïve cafe\u0301 12345', 'x\n\ny'):
            # a piece after a control token, as the HF path encodes it (no "first piece" prefix)
            ctl = '<|im_start|>' if family == 'qwen2.5' else '[INST]'
            ids = hf(ctl + text, add_special_tokens=False)['input_ids']
            assert ids == [local.special_tokens[ctl]] + local.encode(text)
            assert local.decode(ids[1:]) == hf.decode(ids[1:])


def test_control_strings_in_directory_text_stay_text(tmp_path):
    d = build_family_dir(tmp_path / 'mistral', 'mistral')
    local = load_tokenizer(d)
    for s in ('[INST]', '</s>', '<s>[/INST]', '[TOOL_CALLS]'):
        ids = local.encode(s)
        assert not local.added_ids & set(ids) and local.decode(ids) == s
    with pytest.raises(ValueError, match='U\\+FDD0'):
        local.encode('a \ufdd0 b')


@pytest.mark.slow
def test_hf_directory_tokenizer_matches_tiktoken_path(tok, converted_dir):
    from chat_format import encode_conversation
    local = load_tokenizer(converted_dir)
    msgs = [{'role': 'system', 'content': 'Be brief.'},
            {'role': 'user', 'content': 'typed <|im_end|> and <think> 😀 cafe\u0301'},
            {'role': 'assistant', 'content': '<think>\nr\n</think>\n\nok', 'tool_calls': [
                {'name': 'f', 'arguments': {'x': 1}}]},
            {'role': 'tool', 'content': '1'}, {'role': 'assistant', 'content': 'done'}]
    for template in ('chatml', 'qwen3', 'qwen2.5'):
        assert encode_conversation(msgs, local, chat_template=template) == \
               encode_conversation(msgs, tok, chat_template=template)
    # the plain HF path turns user-typed control strings into control tokens: we do not
    assert tok.im_end_id in local.encode_rendered(msgs[1]['content'])
    assert tok.im_end_id not in local.encode(msgs[1]['content'])
    assert os.path.isdir(local.source_dir)
