"""Chat formats: messages -> (input_ids, labels) with exact masks, for any model's own format.

    ids, labels = encode_conversation(messages, tokenizer, train_on='all', chat_template='llama3')
    prompt_ids = encode_prompt(history, tokenizer, chat_template='llama3')

chat_template names a built-in format (chat_families.py: chatml, qwen3, qwen2.5, llama3, mistral,
segment-exact by construction) or 'hf', the general path for ANY Hugging Face chat template (the
tokenizer directory's own; TemplateFormat says what it guarantees and what it cannot).

How a format is chosen (resolve_format): an explicit name wins; the built-in Qwen3 tokenizer gets
'chatml'; a tokenizer directory whose chat template gives the same token ids as a built-in on a few
probe conversations (every generation prompt, and whole conversations without a system prompt)
gets that built-in (Llama 3.2's dated template is probed with date_string='26 Jul 2024'); any other
template gets 'hf'; a directory without a template gets 'chatml' if it has <|im_start|> and
<|im_end|>, else an error asking for --chat_template. The format used is recorded (ChatFormat.meta
in meta.json and checkpoints: name, end-of-turn and stop ids, template hash, the template itself
for 'hf') so training, evaluation, chat and export agree.
"""
from __future__ import annotations

import hashlib
import re

from chat_families import (BUILTINS, LLAMA3_DATE, ChatFormat, added_token_re, trained_flags,
                           encode_mixed)
from tokenizer import INTERNAL_CHARS, ChatTokenizer

FORMATS = ('chatml', 'qwen3', 'qwen2.5', 'llama3', 'mistral', 'hf')


# ----------------------------------------------------------------------------------------------
# The general path: any Hugging Face chat template

MARK_START, MARK_END = INTERNAL_CHARS[1], INTERNAL_CHARS[2]
_MARKED = re.compile(re.escape(MARK_START) + '(.*?)' + re.escape(MARK_END), re.S)


class TemplateError(ValueError):
    """A chat template that cannot give exact masks for a conversation."""


class TemplateFormat(ChatFormat):
    """Any Hugging Face chat template, with masks derived by incremental rendering.

    For each assistant turn k (message index a) three renderings are tokenized: P = the
    conversation before the turn with add_generation_prompt=True, F = the conversation up to and
    including the turn, and W = the whole conversation. P and F must be token prefixes of W (so the
    tokens a reply is trained after are exactly the prompt inference gives the model); the trained
    span is W[len(P):], through the last end-of-turn token inside W[:len(F)] (the tokenizer's eos
    and generation_config's eos ids); anything after that token is masked glue. Otherwise the
    conversation is refused, naming the template and the first differing turn: a template that
    rewrites earlier turns (Mistral v3 moving the system prompt, Qwen3 dropping old reasoning), a
    reply that merges with its header into one token, a turn with no end-of-turn token.

    Rendering is transformers' own (render_jinja_template, the bos/eos/... strings as variables,
    messages without None values), and tokenization is the directory's tokenizer.json, so the ids
    are those of apply_chat_template(tokenize=True). What it cannot promise on its own: keeping
    user text that spells a control token as text. So strings from the data are marked before
    rendering (every added token in system / user / tool text and in tool schemas, the special
    ones in replies) and encoded as plain text after it; a template that cuts such a string
    apart (slicing, split) leaves a lone marker and the conversation is refused. The built-in
    formats need none of this: they are exact by construction."""
    name = 'hf'

    def __init__(self, tok: ChatTokenizer, template: str | None = None, origin: str | None = None,
                 check: bool = True):
        self.tok = tok
        self.source = template if template is not None else tok.chat_template
        self.origin = origin or (f'{tok.source_dir}/chat_template' if tok.source_dir else 'chat template')
        if not self.source:
            raise ValueError(f"chat_template='hf': tokenizer {tok.name} has no chat template "
                             '(tokenizer_config.json "chat_template" or chat_template.jinja)')
        ends = set(tok.stop_ids) | {i for i in (tok.eos_id,) if i is not None}
        if not ends:
            raise ValueError(f"chat_template='hf': tokenizer {tok.name} declares no eos_token and "
                             'generation_config.json no eos_token_id: nothing ends a reply')
        self.end_ids = frozenset(ends)
        self.end_id = tok.eos_id if tok.eos_id is not None else min(ends)
        self.ids = {}
        self.variables = {k: v for k, v in tok.named_tokens.items()}
        self._special_re = re.compile('|'.join(re.escape(t) for t in sorted(tok.special_tokens, key=len, reverse=True)
                                                if t not in tok.text_tokens) or '(?!)')
        sha = hashlib.sha256(self.source.encode()).hexdigest()
        self.label = f'{self.origin} (sha256 {sha[:12]})'
        if check:   # a template unusable for the simplest exchange is refused before any work
            self.encode([{'role': 'user', 'content': 'Hi.'}, {'role': 'assistant', 'content': 'Hello!'}])

    @property
    def template(self) -> str:
        return self.source

    def meta(self) -> dict:
        return dict(super().meta(), template=self.source, origin=self.origin)

    def _marked(self, messages):
        """Messages as the template sees them, with data strings marked (see the class doc)."""
        everything, special_only = added_token_re(self.tok), self._special_re

        def mark(x, pat):
            if isinstance(x, str):
                if any(c in x for c in INTERNAL_CHARS):
                    raise TemplateError('a string holds U+FDD0..U+FDD2, Unicode noncharacters nanoSFT '
                                        'reserves for its own markers')
                return pat.sub(lambda m: MARK_START + m.group() + MARK_END, x)
            if isinstance(x, dict):
                return {k: mark(v, pat) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [mark(v, pat) for v in x]
            return x
        out = []
        for m in messages:
            pat = special_only if m['role'] == 'assistant' else everything
            # apply_chat_template drops None-valued keys; 'train' and 'tools' are ours
            out.append(mark({k: v for k, v in m.items() if k not in ('train', 'tools') and v is not None}, pat))
        tools = messages[0].get('tools') if messages else None
        return out, (mark(tools, everything) if tools else None)

    def _render(self, messages, tools, generation_prompt: bool, **kw) -> str:
        from transformers.utils import chat_template_utils as ctu
        try:
            if hasattr(ctu, 'render_jinja_template'):
                rendered, _ = ctu.render_jinja_template(conversations=[messages], tools=tools,
                                                        chat_template=self.source,
                                                        add_generation_prompt=generation_prompt,
                                                        **self.variables, **kw)
                return rendered[0]
            # older transformers (4.51) render inside apply_chat_template, from this compiled template
            return ctu._compile_jinja_template(self.source).render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=generation_prompt,
                **self.variables, **kw)
        except Exception as e:   # jinja raises TemplateError, UndefinedError, TypeError...
            raise TemplateError(f'chat template {self.label}: rendering failed: {type(e).__name__}: {e}') from None

    def _tokenize(self, text: str) -> list[int]:
        if MARK_START not in text and MARK_END not in text:
            return self.tok.encode_rendered(text)
        if getattr(self.tok, 'flagged_tokens', None):
            raise TemplateError(f'tokenizer {self.tok.name} has lstrip/rstrip/normalized added tokens: '
                                'control-token strings in the data cannot be kept text in the general path')
        # split at the template's own added tokens only; the marked data stays plain text
        parts, pos = [], 0
        for m in _MARKED.finditer(text):
            parts += [(text[pos:m.start()], True), (m.group(1), False)]
            pos = m.end()
        parts.append((text[pos:], True))
        if any(MARK_START in p or MARK_END in p for p, _ in parts):
            raise TemplateError(f'chat template {self.label} cut apart a control-token string that came '
                                'from the data; it cannot be kept plain text')
        return encode_mixed(self.tok, parts)

    def _ids(self, messages, tools, generation_prompt=False, **kw) -> list[int]:
        return self._tokenize(self._render(messages, tools, generation_prompt, **kw))

    def encode(self, messages, train_on: str = 'all') -> tuple[list[int], list[int]]:
        trained = trained_flags(messages, train_on)
        marked, tools = self._marked(messages)
        whole = self._ids(marked, tools)
        labels = [-100] * len(whole)
        turn = 0
        for a, m in enumerate(messages):
            if m['role'] != 'assistant':
                continue
            turn += 1
            p = self._ids(marked[:a], tools, True) if a else None
            f = whole if a == len(messages) - 1 else self._ids(marked[:a + 1], tools)
            for what, ids in (('the conversation before it, with the generation prompt', p),
                              ('the conversation up to and including it', f)):
                if ids is not None and whole[:len(ids)] != ids:
                    k = next((j for j, (x, y) in enumerate(zip(ids, whole)) if x != y), min(len(ids), len(whole)))
                    raise TemplateError(
                        f'chat template {self.label} is not prefix-consistent at assistant turn {turn} '
                        f'(message {a}): {what} renders ...{self.tok.decode(ids[max(0, k - 8):k + 8])!r} '
                        f'where the whole conversation has ...{self.tok.decode(whole[max(0, k - 8):k + 8])!r}; '
                        'it rewrites earlier turns or merges a reply with its header. Use a built-in '
                        f'format (--chat_template {"|".join(FORMATS[:-1])}) or change the data')
            begin = len(p) if p is not None else self._reply_start(f)
            ends = [j for j in range(begin, len(f)) if f[j] in self.end_ids]
            if not ends:
                raise TemplateError(f'chat template {self.label}: assistant turn {turn} (message {a}) has '
                                    f'no end-of-turn token (ids {sorted(self.end_ids)}) after it')
            if trained[a]:
                labels[begin:ends[-1] + 1] = whole[begin:ends[-1] + 1]
        return whole, labels

    def _reply_start(self, f: list[int]) -> int:
        # a conversation that opens with a reply: its prompt is the template's empty-history prompt
        p = self._ids([], None, True)
        if f[:len(p)] != p:
            raise TemplateError(f'chat template {self.label}: a conversation that starts with an '
                                'assistant turn does not start with the generation prompt')
        return len(p)

    def prompt(self, messages, enable_thinking=True):
        marked, tools = self._marked(messages)
        return self._ids(marked, tools, True, enable_thinking=enable_thinking)


# ----------------------------------------------------------------------------------------------
# Choosing a format

_PROBES = (
    [{'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': 'It is 4.'},
     {'role': 'user', 'content': 'And 3 + 3?'}, {'role': 'assistant', 'content': 'It is 6.'}],
    [{'role': 'system', 'content': 'You are terse.'}, {'role': 'user', 'content': 'Name a colour.'},
     {'role': 'assistant', 'content': 'Blue.'}, {'role': 'user', 'content': 'Another one?'},
     {'role': 'assistant', 'content': 'Red.'}],
)


def get_format(name, tok: ChatTokenizer, template: str | None = None) -> ChatFormat:
    """A format by name ('hf' takes `template`, default the tokenizer directory's own); cached
    per tokenizer. A ChatFormat passes through."""
    if isinstance(name, ChatFormat):
        return name
    cache = tok.formats
    key = (name, template)
    fmt = cache.get(key)
    if fmt is None:
        if name == 'hf':
            fmt = TemplateFormat(tok, template)
        elif name in BUILTINS:
            fmt = BUILTINS[name](tok)
        else:
            raise ValueError(f'chat_template must be one of {FORMATS} (or auto), got {name!r}')
        cache[key] = fmt
    return fmt


def _same_as(fmt: ChatFormat, general: TemplateFormat) -> bool:
    """Same ids as the directory's template on every probe prompt and system-free conversation."""
    for conv in _PROBES:
        for k, m in enumerate(conv):
            if m['role'] == 'assistant' and fmt.prompt(conv[:k]) != general.prompt(conv[:k]):
                return False
        if conv[0]['role'] != 'system' and fmt.encode(conv)[0] != general._ids(*general._marked(conv)):
            return False
    return True


def resolve_format(tok: ChatTokenizer, requested: str | None = 'auto', template: str | None = None,
                   verbose: bool = False) -> ChatFormat:
    """The format to render with: `requested` if it names one, else the rule in the module doc."""
    if requested not in (None, 'auto'):
        return get_format(requested, tok, template)
    if tok.source_dir is None:
        return get_format('chatml', tok)
    if not tok.chat_template:
        if '<|im_start|>' in tok.special_tokens and '<|im_end|>' in tok.special_tokens:
            return get_format('chatml', tok)
        raise ValueError(f'{tok.source_dir}: no chat template (tokenizer_config.json "chat_template" or '
                         'chat_template.jinja) and no <|im_start|>/<|im_end|> tokens: pass '
                         f'--chat_template NAME ({", ".join(FORMATS[:-1])})')
    probe = TemplateFormat(tok, check=False)
    probe.variables = dict(probe.variables, date_string=LLAMA3_DATE)
    for name in ('qwen3', 'qwen2.5', 'chatml', 'llama3', 'mistral'):
        try:
            fmt = get_format(name, tok)
            if _same_as(fmt, probe):
                return fmt
        except ValueError:   # missing tokens, or the template refuses a probe
            continue
    general = get_format('hf', tok)
    if verbose:
        print(f"chat format: {general.label} matches no built-in format; using it through the "
              "general path (chat_template='hf')")
    return general


def format_from_meta(tok: ChatTokenizer, meta: dict | None, fallback: str = 'chatml') -> ChatFormat:
    """The format recorded by prepare_sft / train_sft (tokenizer meta 'chat_format')."""
    fmt = (meta or {}).get('chat_format') or {}
    name = fmt.get('name') or fallback
    if name == 'auto':
        return resolve_format(tok)
    return get_format(name, tok, fmt.get('template') if name == 'hf' else None)


# ----------------------------------------------------------------------------------------------
# The entry points the rest of nanoSFT uses

def encode_conversation(messages, tokenizer: ChatTokenizer, train_on: str = 'all',
                        chat_template='chatml') -> tuple[list[int], list[int]]:
    """-> (input_ids, labels), labels = -100 where not trained. chat_template: a format name or a
    ChatFormat (see the module docstring for each one's rendering)."""
    return get_format(chat_template, tokenizer).encode(messages, train_on)


def encode_prompt(messages, tokenizer: ChatTokenizer, chat_template='chatml',
                  enable_thinking: bool = True) -> list[int]:
    """The history rendered exactly as in training, then the format's generation prompt."""
    return get_format(chat_template, tokenizer).prompt(messages, enable_thinking)
