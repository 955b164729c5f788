import json
import os
import random

import pytest

from family_tokenizers import MISTRAL_SPECIALS, QWEN25_ADDED, build_family_dir, hf_tokenizer
from tokenizer import (QWEN3_SPECIALS, QWEN_PATTERN, HFChatTokenizer, MetaspaceChatTokenizer,
                       TiktokenChatTokenizer, _load_directory, _tiktoken_ranks, load_tokenizer,
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


def test_trained_family_directories_encode_like_hf(tmp_path):
    # qwen2.5: trained merges that are the natural splits run on tiktoken; mistral: trained
    # without splitting at ▁ (tokens like 'e▁' cross words) runs on the tokenizers library
    for family, encoder in (('qwen2.5', TiktokenChatTokenizer), ('mistral', HFChatTokenizer)):
        d = build_family_dir(tmp_path / family, family)
        local, hf = load_tokenizer(d), hf_tokenizer(d)
        assert type(local) is encoder
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


# ----------------------------------------------------------------------------------------------
# Which encoder runs a directory, and that it gives the `tokenizers` library's ids (tokenizer.py:
# _tiktoken_ranks, _metaspace_plan). Tiny tokenizers trained here; every fast encoder is compared
# with the library on generated texts.

CONTROL = ['<|im_end|>', '<|im_start|>user\n', '<tool_call>', '</tool_call>', '<|endoftext|>',
           '[INST]', '[/INST]', '</s>', '<s>', '<unk>']
PIECES = (['the', ' cat', 'Hello', ' WORLD', "don't", " it's", "I'M", '12345678', ' 3.14', '-7',
           'x+y=z', '(a)', 'café', 'cafe\u0301', 'ﬁne', 'Ünïcödé', ' naïve', '日本語', 'のテキスト',
           'Привет', ' مرحبا', '😀', '👍🏽', '👨\u200d👩\u200d👧', '\u200b', '\u3000', '▁', '▁▁x', '▁ ▁',
           '\x01\x02\x03', 'def f():', '\treturn', '$1,234.5', '...!!', "'s", '«»', '—']
          + [' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', ' \n ', '  \n\n  ', '\n\t'])


def _texts(seed, n=300, control=True):
    """Mixed scripts, digits, whitespace runs, emoji, and (control) added-token strings."""
    rng = random.Random(seed)
    out = ['', ' ', '  ', 'a', ' a', 'a ', '\n', '▁', '▁a', ' ▁a', '\x0e\x0f\x10', 'x\x0e\x0f\x10y']
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.1:
                parts.append(''.join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(1, 4))))
            elif r < 0.18 and control:
                parts.append(rng.choice(CONTROL))
            else:
                parts.append(rng.choice(PIECES))
            parts.append(rng.choice(['', '', ' ', '  ']))
        out.append(''.join(parts))
    return out


def _corpus():
    rng = random.Random(1)
    return [''.join(rng.choice(PIECES) + rng.choice(['', ' ']) for _ in range(20)) for _ in range(300)]


def _save_dir(path, tok, named=None):
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, 'tokenizer.json'))
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
        json.dump(named or {}, f)
    return str(path)


def _ids(encode, text):
    try:
        return encode(text)
    except ValueError as e:   # plain text that would become an added token: both must refuse it
        return type(e)


def _assert_library_ids(fast, path, texts, ctl):
    """fast's encode and encode_assistant give the library encoder's ids, and plain text after the
    control token `ctl` gives what the directory's own tokenizer gives."""
    lib = _load_directory(path, encoder='tokenizers')
    assert type(lib) is HFChatTokenizer
    backend, ctl_id = fast.backend, fast.special_tokens[ctl]
    for text in texts:
        ids = _ids(fast.encode, text)
        assert ids == _ids(lib.encode, text), text
        assert _ids(fast.encode_assistant, text) == _ids(lib.encode_assistant, text), text
        if ids is not ValueError and not any(s in text for s in fast.special_tokens):
            assert backend.encode(ctl + text, add_special_tokens=False).ids == [ctl_id] + ids, text
    if isinstance(fast, HFChatTokenizer):   # its sentinel character cannot be text
        with pytest.raises(ValueError, match='U\\+FDD0'):
            fast.encode('a \ufdd0 b')


# byte-level BPE ------------------------------------------------------------------------------

def _rank_bpe(token, rank):
    """tiktoken's merging written out (no whole-piece lookup): (final symbols, last merge)."""
    parts, last = list(token), None
    while len(parts) > 1:
        found = [(rank[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in rank]
        if not found:
            break
        i = min(found)[1]
        last = (parts[i], parts[i + 1])
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts, last


def _trained_byte_level(gpt2_style=False):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if gpt2_style:   # GPT-2 / SmolLM: the ByteLevel pre-tokenizer's own regex, no normalizer
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:            # Qwen2.5: NFC, the Qwen regex, then bytes
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior='isolated', invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return json.loads(tok.to_str())


UNREACHABLE = '\u010e\u010f\u0110'   # bytes 0e 0f 10 in the byte-level alphabet: not in _corpus


def _one_merge_per_token(spec, ignore_merges=False):
    """Qwen2.5's shape: one merge per token, its natural split, in rank order; plus one token that
    merging never builds (three bytes no pair of which is a token), as some vocabularies hold."""
    vocab = spec['model']['vocab']
    a, b, c = UNREACHABLE
    assert not {a + b, b + c, UNREACHABLE} & vocab.keys()
    vocab[UNREACHABLE] = len(vocab)
    merges = []
    for t in sorted(vocab, key=vocab.get):
        parts, last = _rank_bpe(t, vocab)
        if len(t) > 1 and parts == [t]:
            merges.append(list(last))
    spec['model'].update(merges=merges, ignore_merges=ignore_merges)
    return spec


def _byte_level_dir(path, spec, added=()):
    from tokenizers import AddedToken, Tokenizer
    tok = Tokenizer.from_str(json.dumps(spec))
    for content, special in QWEN25_ADDED + list(added):   # after the vocabulary, as in Qwen
        t = AddedToken(content, special=special, normalized=False)
        tok.add_special_tokens([t]) if special else tok.add_tokens([t])
    return _save_dir(path, tok, {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'})


@pytest.mark.parametrize('ignore_merges', [False, True])
def test_one_merge_per_token_byte_level_bpe_runs_on_tiktoken_with_the_library_ids(tmp_path, ignore_merges):
    spec = _one_merge_per_token(_trained_byte_level(), ignore_merges)
    vocab = spec['model']['vocab']
    assert len(spec['model']['merges']) == len(vocab) - 256 - 1   # every token but bytes + one
    d = _byte_level_dir(tmp_path / 'qwen25_shipped', spec)
    tok = _load_directory(d)
    assert type(tok) is TiktokenChatTokenizer
    _assert_library_ids(tok, d, _texts('one-merge'), '<|im_start|>')
    # the unreachable token: Hugging Face merges never build it; its whole-piece lookup does
    unreachable = vocab[UNREACHABLE]
    assert (unreachable in tok.encode('x\x0e\x0f\x10y')) == ignore_merges
    assert tok.decode([unreachable]) == '\x0e\x0f\x10'
    assert set(tok.kept_out) == (set() if ignore_merges else {unreachable})


def test_added_token_that_merging_builds_is_refused_in_text_like_the_library(tmp_path):
    # an added token whose content is also a vocabulary token keeps that token's id (the Qwen
    # vocabulary holds '<s>', which Mistral-style specials then reuse): plain text can merge into it
    spec = _one_merge_per_token(_trained_byte_level())
    vocab = spec['model']['vocab']
    assert 'the' in vocab
    d = _byte_level_dir(tmp_path / 'reused', spec, [('the', True)])
    tok = _load_directory(d)
    assert type(tok) is TiktokenChatTokenizer and tok.special_tokens['the'] == vocab['the']
    _assert_library_ids(tok, d, _texts('reused', n=100) + ['the', 'the cat', 'cat the', 'other'], '<|im_start|>')
    for encode in (tok.encode, tok.encode_assistant):
        with pytest.raises(ValueError, match='encodes to an added token id'):
            encode('the cat')
    assert tok.encode(' the') == [vocab['\u0120the']]   # 'Ġthe' is another token


def _text_of(token):
    """The text a byte-level token stands for, None when it is not whole UTF-8."""
    from tokenizer import _bytes_to_unicode
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    try:
        return bytes(to_byte[c] for c in token).decode('utf-8')
    except UnicodeDecodeError:
        return None


def _broken(spec, how):
    """A one-merge file tiktoken would NOT reproduce, and a token t whose text (one pre-tokenized
    piece) it would encode as t while the library cannot build t."""
    import regex
    vocab, merges = spec['model']['vocab'], spec['model']['merges']
    for k, (x, y) in enumerate(merges):
        t, text = x + y, _text_of(x + y)
        other = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab]
        if len(other) > 1 and text and regex.findall(QWEN_PATTERN, text) == [text]:
            break
    else:
        raise AssertionError('no token with two splits in the vocabulary')
    if how == 'split':   # the listed merge is not the natural split
        merges[k] = list(next(p for p in other if p != (x, y)))
    else:                # two natural splits listed out of rank order
        merges[k], merges[k - 1] = merges[k - 1], merges[k]
    return spec, t, text


@pytest.mark.parametrize('how', ['split', 'order'])
def test_one_merge_file_tiktoken_would_not_reproduce_runs_on_the_library(tmp_path, how):
    spec, t, text = _broken(_one_merge_per_token(_trained_byte_level()), how)
    assert _tiktoken_ranks(spec) is None   # refused by the check itself, not only by the probe
    d = _byte_level_dir(tmp_path / how, spec)
    tok = _load_directory(d)
    assert type(tok) is HFChatTokenizer
    _assert_library_ids(tok, d, _texts('broken', n=100), '<|im_start|>')
    if how == 'split':   # tiktoken on these ranks looks the piece up; the library cannot build it
        import tiktoken
        from tokenizer import _bytes_to_unicode
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        ranks = {bytes(to_byte[c] for c in k): v for k, v in spec['model']['vocab'].items()}
        enc = tiktoken.Encoding('broken', pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
        t_id = spec['model']['vocab'][t]
        assert enc.encode_ordinary(text) == [t_id] and tok.encode(text) != [t_id]


def test_trained_gpt2_style_bpe_gives_the_library_ids_on_whichever_encoder_is_chosen(tmp_path):
    spec = _trained_byte_level(gpt2_style=True)
    d = _byte_level_dir(tmp_path / 'gpt2', spec)
    tok = _load_directory(d)
    # a trained BPE's merges are its tokens' natural splits unless training met a word whose
    # merging differs from the token's own; either way the ids must be the library's
    assert type(tok) in (TiktokenChatTokenizer, HFChatTokenizer)
    _assert_library_ids(tok, d, _texts('gpt2'), '<|im_start|>')


def test_one_merge_directory_renders_conversations_like_the_library(tmp_path):
    from chat_format import get_format
    from family_tokenizers import conversations
    d = _byte_level_dir(tmp_path / 'q', _one_merge_per_token(_trained_byte_level()))
    fast, lib = _load_directory(d), _load_directory(d, encoder='tokenizers')
    assert type(fast) is TiktokenChatTokenizer
    for msgs in conversations('qwen2.5', inject=True)[:60]:
        assert get_format('qwen2.5', fast).encode(msgs) == get_format('qwen2.5', lib).encode(msgs)


# SentencePiece-style BPE (Metaspace) -----------------------------------------------------------

PREPEND = {'type': 'Prepend', 'prepend': '\u2581'}
REPLACE = {'type': 'Replace', 'pattern': {'String': ' '}, 'content': '\u2581'}


def _sentencepiece_style(scheme='first', split=False, byte_fallback=True, unk_added=True,
                         ignore_merges=False, crossing=False, complete=False):
    """Mistral's shape: BPE over ▁-marked text, trained on pieces that start at each ▁ (so no
    token holds ▁ after another character, as in SentencePiece models), then saved as the
    variant asked for; scheme 'legacy' is Llama 2's Prepend + Replace normalizer. crossing: one
    token that does hold ▁ after another character ('e▁'), as no SentencePiece model has.
    complete: the merges as transformers' SentencePiece converter writes them for Mistral / Llama 2
    (every split of every token into two tokens, ordered by the rank of the result)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=byte_fallback, fuse_unk=not byte_fallback))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first', split=True)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f'<0x{b:02X}>' for b in range(256)] if byte_fallback else []
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=1500, special_tokens=MISTRAL_SPECIALS + byte_tokens, show_progress=False))
    spec = json.loads(tok.to_str())   # byte pieces (and <unk> if asked) are vocabulary, not added
    plain = set(byte_tokens) | (set() if unk_added else {'<unk>'})
    spec['added_tokens'] = [t for t in spec['added_tokens'] if t['content'] not in plain]
    if scheme == 'legacy':
        spec['normalizer'] = {'type': 'Sequence', 'normalizers': [PREPEND, REPLACE]}
        spec['pre_tokenizer'] = None
    else:
        spec['pre_tokenizer'].update(prepend_scheme=scheme, split=split)
    spec['model']['ignore_merges'] = ignore_merges
    vocab, merges = spec['model']['vocab'], spec['model']['merges']
    # runs of ▁ as tokens, as SentencePiece vocabularies have for runs of spaces
    extra = [('\u2581', '\u2581'), ('\u2581' * 2, '\u2581' * 2), ('\u2581' * 2, 'the')]
    for a, b in extra + ([('e', '\u2581')] if crossing else []):
        vocab[a + b] = len(vocab)
        merges.append([a, b])
    if complete:
        pieces = {f'<0x{b:02X}>' for b in range(256)}
        spec['model']['merges'] = [[t[:k], t[k:]] for t in sorted(vocab, key=vocab.get) if t not in pieces
                                   for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    return spec


def _sentencepiece_dir(path, spec):
    from tokenizers import Tokenizer
    return _save_dir(path, Tokenizer.from_str(json.dumps(spec)),
                     {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'})


@pytest.mark.parametrize('variant', [
    dict(scheme='first'), dict(scheme='first', split=True), dict(scheme='always'),
    dict(scheme='always', split=True), dict(scheme='never'), dict(scheme='legacy'),
    dict(scheme='first', byte_fallback=False, unk_added=False),
    dict(scheme='first', split=True, ignore_merges=True), dict(scheme='first', split=True, crossing=True),
    dict(scheme='first', complete=True), dict(scheme='first', split=True, complete=True),
    dict(scheme='always', complete=True), dict(scheme='legacy', complete=True)])
def test_sentencepiece_style_bpe_runs_word_by_word_with_the_library_ids(tmp_path, variant):
    d = _sentencepiece_dir(tmp_path / 'sp', _sentencepiece_style(**variant))
    tok = _load_directory(d)
    assert type(tok) is MetaspaceChatTokenizer
    # on tiktoken where the merges are the converter's complete list (as Mistral ships them); the
    # extra ▁-run tokens listed out of merging order, or no byte fallback, keep the word cache
    assert (tok.enc is not None) == bool(variant.get('complete'))
    _assert_library_ids(tok, d, _texts(str(variant)), '[INST]')
    assert len(tok._word_ids) > 100 or tok.enc is not None   # the words were cached


@pytest.mark.parametrize('variant', [dict(crossing=True), dict(ignore_merges=True)])
def test_sentencepiece_style_bpe_the_word_cut_would_change_runs_on_the_library(tmp_path, variant):
    """Without ▁-splitting, the model sees the whole text: a token that crosses the cut, or the
    whole-text lookup of ignore_merges, can give other ids than word by word."""
    from tokenizer import _metaspace_plan
    spec = _sentencepiece_style(**variant)
    assert _metaspace_plan(spec) is None
    d = _sentencepiece_dir(tmp_path / 'sp', spec)
    tok = _load_directory(d)
    assert type(tok) is HFChatTokenizer
    _assert_library_ids(tok, d, _texts('cut', n=100), '[INST]')
    forced = MetaspaceChatTokenizer(spec, tok.special_tokens, (), ('\u2581', None, False),
                                    backend=tok.backend)
    # crossing: 'e▁' joins the two words; ignore_merges: '<0x41>' is a token as a word, while the
    # library merges its characters inside the whole text
    text = 'the e e' if variant.get('crossing') else '<0x41> x'
    assert forced.encode(text) != tok.encode(text)


def test_sentencepiece_style_directory_renders_conversations_like_the_library(tmp_path):
    from chat_format import get_format
    from family_tokenizers import conversations
    d = _sentencepiece_dir(tmp_path / 'sp', _sentencepiece_style())
    fast, lib = _load_directory(d), _load_directory(d, encoder='tokenizers')
    assert type(fast) is MetaspaceChatTokenizer
    for msgs in conversations('mistral', inject=True)[:60]:
        assert get_format('mistral', fast).encode(msgs) == get_format('mistral', lib).encode(msgs)


def test_sentencepiece_word_cache_is_bounded(tmp_path, monkeypatch):
    import tokenizer
    monkeypatch.setattr(tokenizer._WordIds, 'LIMIT', 8)
    d = _sentencepiece_dir(tmp_path / 'sp', _sentencepiece_style())
    tok, lib = _load_directory(d), _load_directory(d, encoder='tokenizers')
    for text in _texts('bounded', n=50):
        assert _ids(tok.encode, text) == _ids(lib.encode, text), text
        assert len(tok._word_ids) <= 8
