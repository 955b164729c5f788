"""The built-in chat formats, one class per model family: messages -> (ids, trained) segments.

Segment-exact: control tokens are inserted as ids and text is encoded as text, so nothing a user,
system prompt or tool result says can become a control token, and the mask boundaries are where the
format puts them, not where a string search finds them.

  chatml   <|im_start|>{role}\\n{content}<|im_end|>\\n, no default system prompt (tools and tool
           calls in Qwen3's style, reasoning_content as a <think> block)
  qwen3    ChatML with the official Qwen3 template's thinking policy (see Qwen3)
  qwen2.5  ChatML with Qwen2.5's default system prompt and tool format
  llama3   Llama 3.1 / 3.2 / 3.3: <|begin_of_text|>, <|start_header_id|>{role}<|end_header_id|>\\n\\n
           {content|trim}<|eot_id|>, the system header's "Cutting Knowledge Date: December 2023 /
           Today Date: 26 Jul 2024" (the 3.1 template's fixed date; 3.2's template would print the
           day it runs), tools in the first user message, tool results as `ipython` turns
  mistral  instruct v3: <s>[INST] {user}[/INST] {reply|trim}</s>...; the system prompt and the
           [AVAILABLE_TOOLS] go before the LAST user message (mistral-common's rule; the official
           v0.3 jinja drops the system prompt once the conversation ends with a reply), so replies
           before that turn are trained without them, as Mistral trains them; tool calls as
           [TOOL_CALLS] [...]</s> (ids of 9 characters), results as [TOOL_RESULTS]

Each renders what its family's official chat template renders (chat_templates/<name>.jinja, which
export_hf.py ships with the model), token for token, with one deliberate exception: a reply is
encoded apart from its turn header, so the tokens in front of it are exactly the generation prompt
inference uses; Hugging Face tokenizes the whole string and merges a reply that starts with
whitespace and a newline into the header. Trained: each assistant turn's body (content, tool calls,
<think> block) and its end-of-turn token; masked: everything else, including the glue after the
end-of-turn token and padding. `reasoning_content` exists only in chatml and qwen3; the other
families' templates drop it, and so do these renderers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from tokenizer import ChatTokenizer

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'chat_templates')
LLAMA3_DATE = '26 Jul 2024'


def _tojson(x, indent=None) -> str:
    # transformers' `tojson` filter (jinja's own escapes HTML and sorts keys)
    return json.dumps(x, ensure_ascii=False, indent=indent)


def _call(call: dict) -> dict:
    return call.get('function') or call


def added_token_re(tok: ChatTokenizer):
    pat = tok.__dict__.get('_added_re')
    if pat is None:   # longest first: a token wins over the tokens it contains
        pat = tok._added_re = re.compile('|'.join(map(re.escape, sorted(tok.special_tokens, key=len,
                                                                          reverse=True))) or '(?!)')
    return pat


def encode_mixed(tok: ChatTokenizer, parts) -> list[int]:
    """ids of a string given as (text, is_markup) parts: added tokens are matched in the markup
    only (the template's own tags); the text between two of them is encoded in one piece, as
    Hugging Face encodes it, so data next to markup merges exactly as it does there."""
    ids, run = [], []
    for text, markup in parts:
        if not markup:
            run.append(text)
            continue
        pos = 0
        for m in added_token_re(tok).finditer(text):
            run.append(text[pos:m.start()])
            if any(run):
                ids += tok.encode(''.join(run))
            run, pos = [], m.end()
            ids.append(tok.special_tokens[m.group()])
        run.append(text[pos:])
    if any(run):
        ids += tok.encode(''.join(run))
    return ids


class ChatFormat:
    """One family's rendering. segments() yields (ids, trained) pieces; prompt() is the history
    rendered the same way plus the generation prompt."""
    name = ''
    required: tuple[str, ...] = ()   # tokens the format writes as ids

    def __init__(self, tok: ChatTokenizer):
        missing = [t for t in self.required if t not in tok.special_tokens]
        if missing:
            raise ValueError(f"chat format {self.name!r} needs the tokens {', '.join(missing)}, which "
                             f"tokenizer {tok.name} does not have; pick another --chat_template "
                             "(or 'hf' for the directory's own template)")
        flagged = sorted(set(self.required) & getattr(tok, 'flagged_tokens', frozenset()))
        if flagged:   # lstrip / rstrip / normalized tokens eat or change the text next to them
            raise ValueError(f"chat format {self.name!r}: tokenizer {tok.name} declares "
                             f"{', '.join(flagged)} with lstrip/rstrip/single_word/normalized; the "
                             "built-in renderers insert plain ids; use --chat_template hf")
        self.tok = tok
        self.ids = {t: tok.special_tokens[t] for t in self.required}

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """What ends a generated reply: the end-of-turn token first, then the tokenizer's stops."""
        return tuple(dict.fromkeys((self.end_id, *self.tok.stop_ids)))

    def segments(self, messages, train_on: str):
        raise NotImplementedError

    def prompt(self, messages, enable_thinking: bool = True) -> list[int]:
        raise NotImplementedError

    def answer(self, reply: str) -> str:
        """The part of a generated reply that answers (what an evaluation scores)."""
        return reply

    def encode(self, messages, train_on: str = 'all') -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for seg, trained in self.segments(messages, train_on):
            ids += seg
            labels += seg if trained else [-100] * len(seg)
        return ids, labels

    def _history(self, messages) -> list[int]:
        return [i for seg, _ in self.segments(messages, 'all') for i in seg]

    @property
    def template(self) -> str:
        """The Jinja chat template that renders this format (for export and tests)."""
        with open(os.path.join(TEMPLATE_DIR, f'{self.name}.jinja'), encoding='utf-8') as f:
            return f.read()

    def meta(self) -> dict:
        return {'name': self.name, 'end_id': self.end_id, 'stop_ids': list(self.stop_ids),
                'template_sha256': hashlib.sha256(self.template.encode()).hexdigest()}


def trained_flags(messages, train_on: str) -> list[bool]:
    if train_on not in ('all', 'last'):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    last = max((i for i, m in enumerate(messages) if m['role'] == 'assistant'), default=-1)
    return [m['role'] == 'assistant' and (m['train'] if m.get('train') is not None
                                          else train_on == 'all' or i == last)
            for i, m in enumerate(messages)]


# ----------------------------------------------------------------------------------------------
# ChatML and Qwen3

TOOLS_HEAD = ('# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
              'You are provided with function signatures within <tools></tools> XML tags:\n<tools>')
TOOLS_TAIL = ('\n</tools>\n\nFor each function call, return a json object with function name and '
              'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
              '<function-name>, "arguments": <args-json-object>}\n</tool_call>')


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
        fn = _call(call)
        args = fn.get('arguments', {})
        if not isinstance(args, str):
            args = _tojson(args)
        out.append('<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' + args + '}\n</tool_call>')
    return ''.join(out)


def _last_query_index(messages) -> int:
    # Qwen3: the last user turn that is not a wrapped tool response (multi-step tool use)
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        c = m.get('content') or ''
        if m['role'] == 'user' and not (c.startswith('<tool_response>') and c.endswith('</tool_response>')):
            return i
    return len(messages) - 1


class ChatML(ChatFormat):
    """<|im_start|>{role}\\n{content}<|im_end|>\\n per message, no default system prompt, no BOS.

    ids: [<|im_start|>] + enc(role + "\\n") + enc(content) + [<|im_end|>] + enc("\\n"); the content is
    encoded on its own, so the tokens in front of every reply are the generation prompt
    `<|im_start|>assistant\\n`. Tools follow the Qwen3 template: the schemas in messages[0]['tools']
    become the system turn (merged with a leading system message); an assistant's tool_calls are
    appended as `\\n<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`; a run of `tool`
    messages becomes one user turn of <tool_response> blocks. reasoning_content becomes
    `<think>\\n{reasoning}\\n</think>\\n\\n` in front of the content, on every turn.

    Which strings become ids: <|...|> control tokens never come from text. The added tokens that are
    not "special" (<think>, <tool_call>, <tool_response> and their closing tags) are matched inside
    assistant bodies and template markup, as the HF tokenizer does; in system / user / tool text
    they stay plain text."""
    name = 'chatml'
    required = ('<|im_start|>', '<|im_end|>')

    def __init__(self, tok):
        super().__init__(tok)
        self.end_id = self.ids['<|im_end|>']

    def _tag(self, tag: str) -> list[int]:
        i = self.tok.special_tokens.get(tag)
        return [i] if i is not None else self.tok.encode(tag)

    def _tools_block(self, messages) -> list[int]:
        tok, first = self.tok, messages[0]
        sys_text = first['content'] + '\n\n' if first['role'] == 'system' else ''
        # The schemas are data (a description may say "<tool_call>"): plain text, like user text; only the
        # markup around them matches the added tokens. Cut right after each "\n": the pre-tokenizer keeps
        # a "\n" with the piece before it, so the ids are those of the whole string.
        schemas = [tok.encode(_tojson(t) + '\n') for t in first['tools']]
        return ([self.ids['<|im_start|>']] + tok.encode_cached('system\n') + tok.encode(sys_text)
                + tok.encode_assistant(TOOLS_HEAD + '\n') + [i for ids in schemas for i in ids]
                + tok.encode_assistant(TOOLS_TAIL[1:]) + [self.end_id] + tok.encode_cached('\n'))

    def _body(self, messages, i, last_query) -> str:
        m = messages[i]
        content = m.get('content') or ''
        reasoning = m.get('reasoning_content')
        body = content if reasoning is None else (
            '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n'))
        return body + _tool_calls_text(m, content)

    def segments(self, messages, train_on):
        tok, n = self.tok, len(messages)
        trained = trained_flags(messages, train_on)
        last_query = _last_query_index(messages) if self.name == 'qwen3' else -1
        im_start, im_end = [self.ids['<|im_start|>']], [self.end_id]
        nl = tok.encode_cached('\n')
        skip_first = False
        if messages and messages[0].get('tools'):
            yield self._tools_block(messages), False
            skip_first = messages[0]['role'] == 'system'
        for i, m in enumerate(messages):
            role = m['role']
            if i == 0 and skip_first:
                continue
            if role == 'tool':
                first = i == 0 or messages[i - 1]['role'] != 'tool'
                last = i == n - 1 or messages[i + 1]['role'] != 'tool'
                head = im_start + tok.encode_cached('user\n') if first else nl
                body = (self._tag('<tool_response>') + tok.encode('\n' + m['content'] + '\n')
                        + self._tag('</tool_response>'))
                yield head + body + (im_end + nl if last else []), False
                continue
            yield im_start + tok.encode_cached(role + '\n'), False
            if role != 'assistant':
                yield tok.encode(m['content']) + im_end + nl, False
                continue
            yield tok.encode_assistant(self._body(messages, i, last_query)) + im_end, trained[i]
            yield nl, False

    def prompt(self, messages, enable_thinking=True):
        ids = (self._history(messages) if messages else []) + [self.ids['<|im_start|>']] \
            + self.tok.encode_cached('assistant\n')
        if self.name == 'qwen3' and not enable_thinking:
            ids += self.tok.encode_assistant('<think>\n\n</think>\n\n')
        return ids


class Qwen3(ChatML):
    """ChatML rendered like the official Qwen3 chat template (thinking policy):
    - an assistant's reasoning is `reasoning_content` if given, else parsed from its content:
      reasoning = the text before the last `</think>` (after any `<think>`), content = the text after
      it with leading "\\n" stripped;
    - assistant turns after the last real user query (a user turn that is not a wrapped tool
      response) keep their reasoning: `<think>\\n{reasoning.strip("\\n")}\\n</think>\\n\\n{content}`;
      the LAST message, if it is an assistant turn, always gets the block, empty or not;
    - earlier assistant turns are rendered with the reasoning removed: `{content}`;
    - the generation prompt is `<|im_start|>assistant\\n`, plus `<think>\\n\\n</think>\\n\\n` when
      enable_thinking=False."""
    name = 'qwen3'

    def answer(self, reply: str) -> str:
        # training puts a (maybe empty) <think> block before every final reply: the answer follows it
        return _qwen3_reasoning({'content': reply})[1]

    def _body(self, messages, i, last_query) -> str:
        reasoning, content = _qwen3_reasoning(messages[i])
        if i > last_query and (i == len(messages) - 1 or reasoning):
            body = '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n')
        else:
            body = content
        return body + _tool_calls_text(messages[i], content)


class Qwen25(ChatFormat):
    """ChatML as the official Qwen2.5 template renders it: a default system prompt when the
    conversation has none; tools in the system turn; tool calls with JSON arguments."""
    name = 'qwen2.5'
    required = ('<|im_start|>', '<|im_end|>')
    DEFAULT_SYSTEM = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'

    def __init__(self, tok):
        super().__init__(tok)
        self.end_id = self.ids['<|im_end|>']

    def segments(self, messages, train_on):
        tok, n = self.tok, len(messages)
        trained = trained_flags(messages, train_on)
        S, E, nl = [self.ids['<|im_start|>']], [self.end_id], tok.encode_cached('\n')
        first = messages[0]
        system = first['content'] if first['role'] == 'system' else self.DEFAULT_SYSTEM
        if first.get('tools'):
            parts = [('system\n', True), (system, False), ('\n\n' + TOOLS_HEAD, True)]
            for t in first['tools']:
                parts += [('\n', True), (_tojson(t), False)]
            yield S + encode_mixed(tok, parts + [(TOOLS_TAIL, True)]) + E + nl, False
        elif first['role'] == 'system':
            yield S + tok.encode('system\n' + system) + E + nl, False
        else:
            yield S + tok.encode_cached('system\n' + system) + E + nl, False
        for i, m in enumerate(messages):
            role, content = m['role'], m.get('content') or ''
            if role == 'tool':
                head = [('user', True)] if i == 0 or messages[i - 1]['role'] != 'tool' else []
                parts = head + [('\n<tool_response>\n', True), (content, False), ('\n</tool_response>', True)]
                last = i == n - 1 or messages[i + 1]['role'] != 'tool'
                yield (S if head else []) + encode_mixed(tok, parts) + (E + nl if last else []), False
            elif role == 'assistant':
                body = content
                if m.get('tool_calls'):
                    calls = ['<tool_call>\n{"name": "' + _call(c)['name'] + '", "arguments": '
                             + _tojson(_call(c).get('arguments')) + '}\n</tool_call>' for c in m['tool_calls']]
                    body = (content + '\n' if content else '') + '\n'.join(calls)
                yield S + tok.encode_cached('assistant\n'), False
                yield tok.encode_assistant(body) + E, trained[i]
                yield nl, False
            elif role == 'user' or i > 0:   # the first system message is the system turn above
                yield S + tok.encode(role + '\n' + content) + E + nl, False

    def prompt(self, messages, enable_thinking=True):
        if not messages:   # the template needs messages[0]; an empty history is the system turn
            messages = [{'role': 'system', 'content': self.DEFAULT_SYSTEM}]
        return self._history(messages) + [self.ids['<|im_start|>']] + self.tok.encode_cached('assistant\n')


# ----------------------------------------------------------------------------------------------
# Llama 3.x

LLAMA3_TOOLS_INTRO = ('Given the following functions, please respond with a JSON for a function call '
                      'with its proper arguments that best answers the given prompt.\n\n'
                      'Respond in the format {"name": function name, "parameters": dictionary of '
                      'argument name and its value}.Do not use variables.\n\n')


class Llama3(ChatFormat):
    """Llama 3.1 / 3.2 / 3.3 Instruct, as the official 3.1 template (chat_templates/llama3.jinja)."""
    name = 'llama3'
    required = ('<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>')

    def __init__(self, tok):
        super().__init__(tok)
        self.end_id = self.ids['<|eot_id|>']
        self.sh, self.eh = self.ids['<|start_header_id|>'], self.ids['<|end_header_id|>']

    def _header(self, role: str) -> list[int]:
        return [self.sh] + self.tok.encode_cached(role) + [self.eh]

    def segments(self, messages, train_on):
        tok, E = self.tok, [self.end_id]
        trained = trained_flags(messages, train_on)
        tools = messages[0].get('tools') if messages else None
        start = 1 if messages and messages[0]['role'] == 'system' else 0
        system = messages[0]['content'].strip() if start else ''
        head = ('\n\n' + ('Environment: ipython\n' if tools else '') + 'Cutting Knowledge Date: '
                f'December 2023\nToday Date: {LLAMA3_DATE}\n\n')
        yield [self.ids['<|begin_of_text|>']] + self._header('system') + tok.encode(head + system) + E, False
        if tools:
            if start >= len(messages):
                raise ValueError("llama3: Cannot put tools in the first user message when there's no "
                                 'first user message!')
            schemas = ''.join(_tojson(t, indent=4) + '\n\n' for t in tools)
            first_user = messages[start]['content'].strip()
            yield (self._header('user') + tok.encode('\n\n' + LLAMA3_TOOLS_INTRO + schemas + first_user)
                   + E), False
            start += 1
        for i in range(start, len(messages)):
            m = messages[i]
            role = m['role']
            if role == 'tool':
                yield self._header('ipython') + tok.encode('\n\n' + _tojson(m['content'])) + E, False
            elif m.get('tool_calls'):
                if len(m['tool_calls']) != 1:
                    raise ValueError('llama3: This model only supports single tool-calls at once!')
                fn = _call(m['tool_calls'][0])
                body = '{"name": "' + fn['name'] + '", "parameters": ' + _tojson(fn.get('arguments')) + '}'
                yield self._header('assistant') + tok.encode_cached('\n\n'), False
                yield tok.encode_assistant(body) + E, trained[i]
            elif role == 'assistant':
                yield self._header('assistant') + tok.encode_cached('\n\n'), False
                yield tok.encode_assistant(m['content'].strip()) + E, trained[i]
            else:
                yield self._header(role) + tok.encode('\n\n' + m['content'].strip()) + E, False

    def prompt(self, messages, enable_thinking=True):
        return self._history(messages) + self._header('assistant') + self.tok.encode_cached('\n\n')


# ----------------------------------------------------------------------------------------------
# Mistral instruct v3

class Mistral(ChatFormat):
    """Mistral instruct v3 (Mistral-7B-Instruct-v0.3 and its tokenizer's control tokens)."""
    name = 'mistral'
    required = ('[INST]', '[/INST]')

    def __init__(self, tok):
        super().__init__(tok)
        if tok.bos_id is None or tok.eos_id is None:
            raise ValueError(f"chat format 'mistral' needs the tokenizer's bos_token and eos_token "
                             f'(<s>, </s>); {tok.name} does not declare both in tokenizer_config.json')
        self.end_id = tok.eos_id

    def _id(self, tag: str) -> int:
        i = self.tok.special_tokens.get(tag)
        if i is None:
            raise ValueError(f"mistral: tool use needs the {tag} token, which {self.tok.name} lacks")
        return i

    @staticmethod
    def _check_id(x, what: str) -> str:
        if not isinstance(x, str) or len(x) != 9:
            raise ValueError(f'mistral: {what}: Tool call IDs should be alphanumeric strings with length 9!')
        return x

    def _tools(self, tools) -> list[int]:
        out = []
        for t in tools:
            fn = t.get('function') or {}
            items = [f'"{k}": "{v}"' if isinstance(v, str) else f'"{k}": {_tojson(v)}'
                     for k, v in fn.items() if k != 'return']
            out.append('{"type": "function", "function": {' + ', '.join(items) + '}}')
        return ([self._id('[AVAILABLE_TOOLS]')] + self.tok.encode(' [' + ', '.join(out) + ']')
                + [self._id('[/AVAILABLE_TOOLS]')])

    def segments(self, messages, train_on):
        tok = self.tok
        trained = trained_flags(messages, train_on)
        start = 1 if messages[0]['role'] == 'system' else 0
        system = messages[0]['content'] if start else None
        tools = messages[0].get('tools')
        users = [m['content'] for m in messages[start:] if m['role'] == 'user']
        k = 0
        for m in messages[start:]:
            if not (m['role'] == 'tool' or m.get('tool_calls')):
                if (m['role'] == 'user') != (k % 2 == 0):
                    raise ValueError('mistral: After the optional system message, conversation roles '
                                     'must alternate user/assistant/user/assistant/...')
                k += 1
        yield [tok.bos_id], False
        for i in range(start, len(messages)):
            m = messages[i]
            role, content = m['role'], m.get('content') or ''
            if role == 'user':
                last = content == users[-1]   # the template compares messages by value
                text = ' ' + (system + '\n\n' if last and system is not None else '') + content
                yield ((self._tools(tools) if tools and last else []) + [self.ids['[INST]']]
                       + tok.encode(text) + [self.ids['[/INST]']]), False
            elif m.get('tool_calls'):
                calls = [_tojson(_call(c))[:-1] + ', "id": "' + self._check_id(c.get('id'), 'tool_calls')
                         + '"}' for c in m['tool_calls']]
                yield ([self._id('[TOOL_CALLS]')] + tok.encode_assistant(' [' + ', '.join(calls) + ']')
                       + [self.end_id]), trained[i]
            elif role == 'assistant':
                yield tok.encode_assistant(' ' + content.strip()) + [self.end_id], trained[i]
            elif role == 'tool':
                call_id = self._check_id(m.get('tool_call_id'), 'tool message tool_call_id')
                yield ([self._id('[TOOL_RESULTS]')] + tok.encode(' {"content": ' + content + ', "call_id": "'
                                                                 + call_id + '"}')
                       + [self._id('[/TOOL_RESULTS]')]), False
            else:
                raise ValueError('mistral: Only user and assistant roles are supported, with the '
                                 'exception of an initial optional system message!')

    def prompt(self, messages, enable_thinking=True):
        # the template has no generation prompt: the model answers right after [/INST]
        return self._history(messages) if messages else [self.tok.bos_id]


BUILTINS = {'chatml': ChatML, 'qwen3': Qwen3, 'qwen2.5': Qwen25, 'llama3': Llama3, 'mistral': Mistral}
