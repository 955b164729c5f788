import os
import re

import pytest

from chat_format import TemplateError, TemplateFormat, encode_conversation, get_format, resolve_format
from family_tokenizers import (FAMILIES, LLAMA30_TEMPLATE, N_CONVERSATIONS, conversations, hf_ids,
                               load_family, moves_context, reference_template, template_text,
                               trained_spans)
from tokenizer import load_tokenizer


@pytest.fixture(scope='module')
def family(request, tmp_path_factory):
    return load_family(request.param, tmp_path_factory.mktemp(request.param.replace('.', '')))


def _expected_refusal(name, msgs) -> bool:
    replies = [i for i, m in enumerate(msgs) if m['role'] == 'assistant']
    if moves_context(name, msgs):
        return True
    if name == 'qwen3':     # the last reply gets a <think> block, earlier ones lose it
        return len(replies) > 1
    return False


@pytest.mark.parametrize('family', FAMILIES, indirect=True)
def test_general_path_matches_each_builtin_and_refuses_exactly_where_a_template_rewrites_turns(family):
    name, tok, hf, fmt = family
    general = TemplateFormat(tok, reference_template(name) or tok.chat_template)
    same = refused = 0
    for msgs in conversations(name):
        expected = _expected_refusal(name, msgs)
        try:
            got = encode_conversation(msgs, tok, chat_template=general)
        except TemplateError as e:
            assert expected, str(e)
            assert 'not prefix-consistent at assistant turn' in str(e) and general.label in str(e)
            refused += 1
            continue
        assert not expected
        assert got == encode_conversation(msgs, tok, chat_template=fmt)
        same += 1
    assert same + refused == N_CONVERSATIONS
    assert (refused > 0) == (name in ('mistral', 'qwen3'))


def _skeleton(tok, ids):
    return [i for i in ids if i in tok.added_ids]


@pytest.mark.parametrize('family', FAMILIES, indirect=True)
def test_control_strings_in_user_system_and_tool_text_never_become_control_tokens(family):
    from family_tokenizers import CONTROL_STRINGS
    name, tok, hf, fmt = family
    general = TemplateFormat(tok, reference_template(name) or tok.chat_template)
    pattern = re.compile('|'.join(map(re.escape, CONTROL_STRINGS[name])))
    checked = 0
    for msgs in conversations(name, inject=True):
        clean = [dict(m, content=pattern.sub('', m['content'])) for m in msgs]
        ids, labels = encode_conversation(msgs, tok, chat_template=fmt)
        want_ids, want_labels = encode_conversation(clean, tok, chat_template=fmt)
        # the same control tokens in the same places: none came from the data
        assert _skeleton(tok, ids) == _skeleton(tok, want_ids)
        assert [i for i, l in zip(ids, labels) if l != -100 and i in tok.added_ids] == \
               [i for i, l in zip(want_ids, want_labels) if l != -100 and i in tok.added_ids]
        text = tok.decode(ids)
        for m in msgs:
            for s in pattern.findall(m['content']):
                assert s in text
        try:   # the general path keeps them text too (where the template is prefix-consistent)
            assert _skeleton(tok, encode_conversation(msgs, tok, chat_template=general)[0]) == _skeleton(tok, ids)
        except TemplateError:
            assert _expected_refusal(name, msgs)
        checked += 1
    assert checked == N_CONVERSATIONS


@pytest.mark.parametrize('family', ['llama3'], indirect=True)
def test_general_path_trains_a_template_no_builtin_covers(family, tmp_path):
    from family_tokenizers import build_family_dir, hf_tokenizer
    d = build_family_dir(tmp_path / 'llama30', 'llama3', chat_template=LLAMA30_TEMPLATE)
    tok, hf = load_tokenizer(d), hf_tokenizer(d)
    fmt = resolve_format(tok)
    assert fmt.name == 'hf' and fmt.template == LLAMA30_TEMPLATE
    for msgs in conversations('llama3')[:60]:
        if msgs[0].get('tools') or any(m['role'] == 'tool' for m in msgs):
            continue   # Llama 3.0's template has no tool use
        ids, labels = encode_conversation(msgs, tok, chat_template=fmt)
        assert ids == hf_ids(hf, msgs)
        eot, spans = tok.special_tokens['<|eot_id|>'], []
        for k, m in enumerate(msgs):
            if m['role'] == 'assistant':
                start = len(hf_ids(hf, msgs[:k], add_generation_prompt=True))
                spans.append(tok.decode(ids[start:ids.index(eot, start) + 1]))
        assert trained_spans(tok, ids, labels) == spans


def _template_dir(tmp_path, template, family='chatml'):
    from family_tokenizers import build_family_dir
    return load_tokenizer(build_family_dir(tmp_path / 'd', family, chat_template=template))


def test_auto_detection_falls_back_to_the_general_path_for_a_modified_template(tmp_path):
    modified = template_text('qwen2.5').replace('You are a helpful assistant.', 'You are helpful.')
    tok = _template_dir(tmp_path, modified, 'qwen2.5')
    assert resolve_format(tok).name == 'hf'
    assert resolve_format(tok, 'qwen2.5').name == 'qwen2.5'   # an explicit name wins


def test_llama32_dated_template_is_detected_as_llama3(tmp_path):
    dated = template_text('llama3').replace(
        '{%- set date_string = "26 Jul 2024" %}',
        '{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
        '{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}')
    assert resolve_format(_template_dir(tmp_path, dated, 'llama3')).name == 'llama3'


def test_directory_without_template_or_chatml_tokens_needs_a_name(tmp_path):
    from family_tokenizers import build_family_dir
    assert resolve_format(load_tokenizer(build_family_dir(tmp_path / 'c', 'chatml'))).name == 'chatml'
    d = build_family_dir(tmp_path / 'm', 'mistral')
    os.remove(os.path.join(d, 'tokenizer_config.json'))
    with pytest.raises(ValueError, match='no chat template .* pass --chat_template NAME'):
        resolve_format(load_tokenizer(d))
    with pytest.raises(ValueError, match="'llama3' needs the tokens <\\|begin_of_text\\|>"):
        get_format('llama3', load_tokenizer(d))


def test_general_path_refusals_name_the_template_and_the_turn(tmp_path):
    from family_tokenizers import MISTRAL_V03_OFFICIAL, build_family_dir
    tok = load_tokenizer(build_family_dir(tmp_path / 'm', 'mistral'))
    official = TemplateFormat(tok, MISTRAL_V03_OFFICIAL, origin='mistral-v0.3')
    conv = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
            {'role': 'assistant', 'content': 'Hello'}]
    with pytest.raises(TemplateError, match=r"mistral-v0\.3 \(sha256 [0-9a-f]{12}\) is not prefix-"
                                            r"consistent at assistant turn 1 \(message 2\)"):
        official.encode(conv)   # it drops the system prompt once a reply follows
    chatml = load_tokenizer(build_family_dir(tmp_path / 'c', 'chatml'))
    general = TemplateFormat(chatml, template_text('chatml'))
    with pytest.raises(TemplateError, match='merges a reply with its header'):
        general.encode([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': '\n\nanswer'}])
    no_end = "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}" \
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    with pytest.raises(TemplateError, match='assistant turn 1 .* has no end-of-turn token'):
        TemplateFormat(chatml, no_end)   # refused before any work
    with pytest.raises(TemplateError, match='rendering failed: TemplateError: nope'):
        TemplateFormat(chatml, "{{ raise_exception('nope') }}")
