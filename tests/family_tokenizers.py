"""Tiny tokenizer directories for each chat family, and random conversations, for the chat tests.

build_family_dir(path, family) writes a Hugging Face tokenizer directory like the family's real one,
at toy size (no downloads): the family's pre-tokenizer and special tokens (as in its
tokenizer.json), its tokenizer_config.json (named tokens, chat template), generation_config.json.
  llama3   byte-level BPE, Llama 3's Split regex, specials after the vocabulary, eos <|eot_id|>
  qwen2.5  byte-level BPE, Qwen's regex + NFC, <tool_call> as a non-special added token
  qwen3    like qwen2.5 with Qwen3's added tokens (<think>, <tool_response> ...)
  mistral  SentencePiece-style BPE (Metaspace "first" piece rule, byte fallback), [INST] & co.
           as ids 0..9, and the VERBATIM official v0.3 template (which auto-detection must map
           to the built-in 'mistral')
  chatml   byte-level BPE with <|im_start|>/<|im_end|> and no template
The BPE is trained (merges) on a fixed text, so it has one merge per token. The byte-level ones
run on tiktoken (their merges are their tokens' natural splits, checked at load: see
tokenizer._tiktoken_ranks); mistral's, trained on whole texts, has tokens that cross words
('e▁'), so it runs on the `tokenizers` library encoder (tokenizer._metaspace_plan refuses it).

random_conversation(rng, family) draws a conversation the family's template is defined on; below
it, what the chat test modules share (load_family, conversations, hf_ids, trained_spans ...).
"""
from __future__ import annotations

import json
import os
import random

from tokenizer import QWEN_PATTERN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
                   '<|reserved_special_token_1|>', '<|finetune_right_pad_id|>', '<|step_id|>',
                   '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>', '<|python_tag|>']
QWEN25_ADDED = [('<|endoftext|>', True), ('<|im_start|>', True), ('<|im_end|>', True),
                ('<|object_ref_start|>', True), ('<|object_ref_end|>', True), ('<tool_call>', False),
                ('</tool_call>', False), ('<|fim_prefix|>', True), ('<|file_sep|>', True)]
QWEN3_ADDED = QWEN25_ADDED + [('<tool_response>', False), ('</tool_response>', False),
                              ('<think>', False), ('</think>', False)]
MISTRAL_SPECIALS = ['<unk>', '<s>', '</s>', '[INST]', '[/INST]', '[TOOL_CALLS]', '[AVAILABLE_TOOLS]',
                    '[/AVAILABLE_TOOLS]', '[TOOL_RESULTS]', '[/TOOL_RESULTS]']
CONTROL_STRINGS = {
    'llama3': ['<|eot_id|>', '<|start_header_id|>assistant<|end_header_id|>\n\n', '<|begin_of_text|>',
               '<|python_tag|>'],
    'mistral': ['</s>', '[INST]', '[/INST] sure', '[TOOL_CALLS] [', '<s>', '[/TOOL_RESULTS]'],
    'qwen2.5': ['<|im_end|>', '<|im_start|>assistant\n', '<tool_call>', '<|endoftext|>'],
    'qwen3': ['<|im_end|>', '<|im_start|>assistant\n', '<think>x</think>', '<tool_response>'],
    'chatml': ['<|im_end|>', '<|im_start|>assistant\n', '<|endoftext|>'],
}
WORDS = ('the a cat dog sun moon tree fish bird red green blue answer question number total apples '
         'price café naïve über 日本 語 テキスト 😀 — « » 12 345 6789 3.14 -7 x+y=z (a) [b] {c} '
         'def return print() if else "quoted" \'single\' don\'t it\'s we\'ll tab\there').split(' ')
# Llama 3.0 Instruct's template (no system preamble, no tools): no built-in format matches it.
LLAMA30_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
                    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
                    "<|end_header_id|>\\n\\n' }}{% endif %}")
TOOLS = [{'type': 'function', 'function': {
             'name': 'get_weather', 'description': 'Weather in a city, now',
             'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}},
                            'required': ['city']}}},
         {'type': 'function', 'function': {
             'name': 'add', 'description': 'Adds two numbers',
             'parameters': {'type': 'object', 'properties': {'a': {'type': 'number'},
                                                             'b': {'type': 'number'}}}}}]


def template_text(name: str) -> str:
    with open(os.path.join(ROOT, 'chat_templates', f'{name}.jinja'), encoding='utf-8') as f:
        return f.read()


def _corpus() -> list[str]:
    rng = random.Random(0)
    text = [' '.join(rng.choice(WORDS) for _ in range(12)) for _ in range(60)]
    return text + ['user assistant system tool ipython\n\n', 'Cutting Knowledge Date: December 2023',
                   'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.']


def _byte_level(pattern: str, added, normalizer=None):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    for content, special in added:   # after the vocabulary, as in Llama 3 and Qwen
        t = AddedToken(content, special=special, normalized=False)
        tok.add_special_tokens([t]) if special else tok.add_tokens([t])
    return tok


def _sentencepiece_like():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first', split=False)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                     decoders.Metaspace(replacement='▁', prepend_scheme='first', split=False)])
    byte_tokens = [f'<0x{b:02X}>' for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=MISTRAL_SPECIALS + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    spec = json.loads(tok.to_str())   # byte-fallback pieces are vocabulary entries, not added tokens
    spec['added_tokens'] = [t for t in spec['added_tokens'] if t['content'] not in byte_tokens]
    return Tokenizer.from_str(json.dumps(spec))


def build_family_dir(path, family: str, chat_template: str | None = None) -> str:
    """A tokenizer directory for `family`; chat_template overrides the family's template."""
    from tokenizers import normalizers
    path = str(path)
    os.makedirs(path, exist_ok=True)
    if family == 'llama3':
        tok = _byte_level(LLAMA3_PATTERN, [(t, True) for t in LLAMA3_SPECIALS])
        config = {'bos_token': '<|begin_of_text|>', 'eos_token': '<|eot_id|>'}
        eos = ['<|end_of_text|>', '<|eom_id|>', '<|eot_id|>']
        template, model_type = template_text('llama3'), 'llama'
    elif family in ('qwen2.5', 'qwen3'):
        tok = _byte_level(QWEN_PATTERN, QWEN25_ADDED if family == 'qwen2.5' else QWEN3_ADDED,
                          normalizers.NFC())
        config = {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}
        eos = ['<|im_end|>', '<|endoftext|>']
        template, model_type = template_text(family), ('qwen2' if family == 'qwen2.5' else 'qwen3')
    elif family == 'mistral':
        tok = _sentencepiece_like()
        config = {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'}
        eos = ['</s>']
        template, model_type = MISTRAL_V03_OFFICIAL, 'mistral'
    elif family == 'chatml':
        tok = _byte_level(QWEN_PATTERN, [('<|endoftext|>', True), ('<|im_start|>', True),
                                         ('<|im_end|>', True)])
        config = {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}
        eos = ['<|im_end|>']
        template, model_type = None, 'qwen2'
    else:
        raise ValueError(family)
    tok.save(os.path.join(path, 'tokenizer.json'))
    config['tokenizer_class'] = 'PreTrainedTokenizerFast'
    template = chat_template if chat_template is not None else template
    if template is not None:
        config['chat_template'] = template
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(path, 'generation_config.json'), 'w') as f:
        json.dump({'eos_token_id': [tok.token_to_id(t) for t in eos]}, f)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump({'model_type': model_type}, f)
    return path


def hf_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def for_hf(messages):
    """(messages, tools) as apply_chat_template takes them: tools apart, no 'train' keys."""
    tools = messages[0].get('tools') if messages else None
    return [{k: v for k, v in m.items() if k not in ('tools', 'train')} for m in messages], tools


# ----------------------------------------------------------------------------------------------
# Random conversations

def _text(rng, lo=1, hi=14, inject=None) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    if rng.random() < 0.2:
        words.insert(rng.randint(0, len(words)), '\n' + rng.choice(['', '-', '1.']))
    if inject:
        words.insert(rng.randint(0, len(words)), rng.choice(inject))
    return ' '.join(words).strip()


def _call_id(rng) -> str:
    return ''.join(rng.choice('abcdefghijkABCDEFGHIJK0123456789') for _ in range(9))


def random_conversation(rng: random.Random, family: str, inject: bool = False) -> list[dict]:
    """A conversation `family`'s official template renders, with system prompts, several turns
    and (where the family has them) tools. inject: control-token strings in every non-assistant
    text (and some replies) -- conversations the Hugging Face path is NOT well defined on."""
    ctl = CONTROL_STRINGS[family] if inject else None
    msgs = []
    if rng.random() < 0.4:
        msgs.append({'role': 'system', 'content': _text(rng, inject=ctl)})
    tools = family in ('llama3', 'qwen2.5', 'qwen3', 'mistral') and rng.random() < 0.3
    for turn in range(rng.randint(1, 3)):
        msgs.append({'role': 'user', 'content': _text(rng, inject=ctl)})
        if tools and turn == 0:
            args = {'city': rng.choice(WORDS)}
            call = {'type': 'function', 'function': {'name': 'get_weather', 'arguments': args}}
            if family == 'mistral':
                call['id'] = _call_id(rng)
            n_calls = 2 if family in ('qwen2.5', 'qwen3') and rng.random() < 0.5 else 1
            calls = [call] + [{'type': 'function', 'function': {'name': 'add',
                                                                'arguments': {'a': 1, 'b': 2}}}] * (n_calls - 1)
            content = _text(rng) if family in ('qwen2.5', 'qwen3') and rng.random() < 0.5 else ''
            msgs.append({'role': 'assistant', 'content': content, 'tool_calls': calls})
            for c in calls:
                result = {'role': 'tool', 'content': _text(rng, inject=ctl)}
                if family == 'mistral':
                    result['tool_call_id'] = call['id']
                msgs.append(result)
        reply = _text(rng, inject=CONTROL_STRINGS[family][:1] if inject and rng.random() < 0.3 else None)
        msgs.append({'role': 'assistant', 'content': reply})
    if tools:
        msgs[0] = dict(msgs[0], tools=TOOLS)
    return msgs


# The official Mistral-7B-Instruct-v0.3 chat template, verbatim (Apache-2.0). It adds the system
# prompt to the last message only when that message is a user turn (at generation time), so it
# drops the system prompt from any conversation that ends with a reply.
MISTRAL_V03_OFFICIAL = template_text('mistral').replace(
    '{%- if message == user_messages[-1] and system_message is defined %}',
    '{%- if loop.last and system_message is defined %}')


# ----------------------------------------------------------------------------------------------
# What the chat tests share

FAMILIES = ('llama3', 'mistral', 'qwen2.5', 'qwen3', 'chatml')
N_CONVERSATIONS = 200
IGNORE = -100


def reference_template(name):
    """The template each built-in must equal token for token: the directory's own (the official
    one), except Mistral (the documented system-prompt placement, see chat_families) and ChatML
    (no template in its directory)."""
    return template_text(name) if name in ('mistral', 'chatml') else None


def load_family(name, directory):
    """(name, tokenizer, transformers tokenizer, auto-detected format) for a fresh family dir."""
    from chat_format import resolve_format
    from tokenizer import load_tokenizer
    d = build_family_dir(directory, name)
    tok = load_tokenizer(d)
    return name, tok, hf_tokenizer(d), resolve_format(tok)


def conversations(name, inject=False):
    rng = random.Random(f'{name}-{inject}')
    return [random_conversation(rng, name, inject) for _ in range(N_CONVERSATIONS)]


def hf_ids(hf, msgs, template=None, **kw):
    m, tools = for_hf(msgs)
    return list(hf.apply_chat_template(m, tools=tools, chat_template=template, return_dict=False, **kw))


def trained_spans(tok, ids, labels):
    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE:
            assert l == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def moves_context(name, msgs) -> bool:
    """Mistral puts the system prompt and [AVAILABLE_TOOLS] before the LAST user turn: replies
    before it are trained without them, so their context is not their generation prompt."""
    replies = [i for i, m in enumerate(msgs) if m['role'] == 'assistant']
    last_user = max(i for i, m in enumerate(msgs) if m['role'] == 'user')
    return (name == 'mistral' and (msgs[0]['role'] == 'system' or bool(msgs[0].get('tools')))
            and replies[0] < last_user)
