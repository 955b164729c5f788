"""Chat with a fine-tuned model: a checkpoint (.pt) or a Hugging Face directory.

    python sample_sft.py out-demo/ckpt.pt                       # interactive multi-turn chat
    python sample_sft.py out-demo/ckpt.pt --prompt "What is 3 + 4?"
    python sample_sft.py out-demo/hf --system "Answer in words." --temperature 0.7 --top_p 0.9

The history is rendered with chat_format.encode_prompt in the chat format the checkpoint was
trained with (recorded in it; for a Hugging Face directory, the format its tokenizer's template
matches), i.e. exactly the tokens training used, followed by the format's generation prompt.
Tokens stream as they are generated; a reply ends at the format's end-of-turn token or another
stop id (generation_config's eos ids), or at --max_new_tokens.
In the chat: /reset forgets the conversation (keeps --system), /exit (or Ctrl-D) quits.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def load_model(path: str, device: str = 'cpu', tokenizer: str | None = None, base: str | None = None):
    """-> (model in eval mode, ChatTokenizer, ChatFormat). `path`: a checkpoint written by
    train_sft.py (a file, or a sharded checkpoint's directory; full or LoRA) or a local Hugging Face
    model directory. base: a LoRA checkpoint's base when it moved since training."""
    from chat_format import format_from_meta, resolve_format
    from checkpoint import base_source, is_sharded_checkpoint, load_checkpoint
    from tokenizer import load_tokenizer
    if not os.path.exists(path):
        raise SystemExit(f'{path}: no such checkpoint file or model directory')
    chat_template, meta = None, {}
    if os.path.isdir(path) and not is_sharded_checkpoint(path):
        from hf_interop import from_hf
        if not os.path.exists(os.path.join(path, 'config.json')):
            raise SystemExit(f'{path}: a directory without config.json is not a Hugging Face model')
        try:
            model = from_hf(path)
        except (ValueError, OSError, KeyError) as e:
            raise SystemExit(f'{path}: cannot load the Hugging Face model: {e}')
        has_tok = os.path.exists(os.path.join(path, 'tokenizer.json'))
        tok_name = tokenizer or (path if has_tok else 'qwen3')
    else:
        from lora import merge_lora
        try:
            model, ckpt = load_checkpoint(path, device='cpu', base=base_source(base) if base else None)
        except ValueError as e:  # CheckpointError names the path and the problem
            raise SystemExit(str(e))
        if getattr(model, 'lora_config', None) is not None:
            # LoRA: fold the adapters in (fp32, equal to the adapter model to ~1e-6): generation then
            # runs one matmul per projection, and QLoRA's NF4 base is not dequantized at every token
            model = merge_lora(model)
        meta = ckpt.get('tokenizer') or {}
        cfg = ckpt.get('config') or {}
        chat_template = cfg.get('chat_template') or 'chatml'   # checkpoints before chat_format
        tok_name = tokenizer or meta.get('name') or 'qwen3'
    try:
        tok = load_tokenizer(tok_name)
        fmt = resolve_format(tok) if chat_template is None else format_from_meta(tok, meta, chat_template)
    except ValueError as e:
        raise SystemExit(f'{path}: {e} (pass --tokenizer)')
    if meta.get('hash') and meta['hash'] != tok.hash:
        print(f'warning: {path} was trained with tokenizer {meta.get("name")} (hash '
              f'{meta["hash"][:12]}), loaded {tok.name} (hash {tok.hash[:12]}); ids may not match',
              file=sys.stderr)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f'{path}: tokenizer {tok.name} has {tok.vocab_size} tokens but the model '
                         f'only {model.config.vocab_size}; wrong --tokenizer?')
    model.to(device).eval()
    return model, tok, fmt


def stop_ids(tok, chat_template='chatml') -> tuple[int, ...]:
    """The ids that end a reply: the format's end-of-turn token and the tokenizer's stop ids."""
    from chat_format import get_format
    return get_format(chat_template, tok).stop_ids


def fit_history(messages: list[dict], tok, chat_template, budget: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest turns (never the system prompt) until the prompt fits in `budget` tokens."""
    from chat_format import encode_prompt
    msgs = list(messages)
    while True:
        ids = encode_prompt(msgs, tok, chat_template=chat_template)
        if len(ids) <= budget:
            return msgs, ids
        first = 1 if msgs and msgs[0]['role'] == 'system' else 0
        if len(msgs) - first <= 1:
            raise SystemExit(f'the prompt is {len(ids)} tokens; the model fits {budget} with '
                             '--max_new_tokens; shorten it or lower --max_new_tokens')
        del msgs[first]
        while len(msgs) > first and msgs[first]['role'] != 'user':
            del msgs[first]  # a conversation must not start with a stranded assistant reply


class Streamer:
    """on_token callback: prints text as soon as it is complete UTF-8 (tokens can split characters)."""

    def __init__(self, tok, out=None, enabled: bool = True, chat_template='chatml'):
        self.tok, self.out, self.enabled = tok, out or sys.stdout, enabled
        self.ids: list[int] = []
        self.printed = 0
        self.stops = set(stop_ids(tok, chat_template))

    def __call__(self, row: int, token_id: int) -> None:
        if token_id in self.stops:
            return
        self.ids.append(int(token_id))
        if not self.enabled:
            return
        text = self.tok.decode(self.ids)
        if text.endswith('\ufffd'):
            return  # wait for the rest of the character
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def reply(model, tok, chat_template, messages, args, generator, stream=True) -> tuple[str, bool]:
    """Generates one assistant turn. -> (text, stopped at a stop token)."""
    budget = model.config.block_size - args.max_new_tokens
    if budget <= 0:
        raise SystemExit(f'--max_new_tokens {args.max_new_tokens} leaves no room for a prompt '
                         f'(block_size {model.config.block_size})')
    messages[:], ids = fit_history(messages, tok, chat_template, budget)
    streamer = Streamer(tok, enabled=stream, chat_template=chat_template)
    out = model.generate([ids], max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         stop_ids=stop_ids(tok, chat_template), generator=generator, on_token=streamer)[0]
    stopped = bool(out) and out[-1] in streamer.stops
    text = tok.decode(out[:-1] if stopped else out)
    if stream:
        sys.stdout.write(text[streamer.printed:] + '\n')
        sys.stdout.flush()
    return text, stopped


def repl(model, tok, chat_template, args, generator) -> None:
    system = [{'role': 'system', 'content': args.system}] if args.system else []
    history = list(system)
    print('chat with the model: /reset starts over, /exit quits', file=sys.stderr)
    while True:
        try:
            line = input('\nyou> ')
        except (EOFError, KeyboardInterrupt):
            print()
            return
        cmd = line.strip()
        if cmd in ('/exit', '/quit'):
            return
        if cmd == '/reset':
            history = list(system)
            print('(conversation reset)', file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({'role': 'user', 'content': line})
        sys.stdout.write('assistant> ')
        try:
            text, stopped = reply(model, tok, chat_template, history, args, generator)
        except KeyboardInterrupt:
            history.pop()
            print('\n(interrupted)', file=sys.stderr)
            continue
        if not stopped:
            print(f'(no end-of-turn token within {args.max_new_tokens} tokens)', file=sys.stderr)
        history.append({'role': 'assistant', 'content': text})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('model', help='checkpoint .pt written by train_sft.py, or a Hugging Face directory')
    p.add_argument('--prompt', default=None, help='one-shot: answer this and exit')
    p.add_argument('--system', default=None, help='system prompt (kept across /reset)')
    p.add_argument('--max_new_tokens', type=int, default=128)
    p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
    p.add_argument('--top_k', type=int, default=None)
    p.add_argument('--top_p', type=float, default=None)
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--tokenizer', default=None, help="override: 'qwen3' or a tokenizer directory")
    p.add_argument('--no_stream', action='store_true', help='print the reply only when complete')
    p.add_argument('--base', default=None,
                   help="LoRA checkpoint: its base ('hf:/dir' or ckpt.pt), when it moved since training")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise SystemExit('--max_new_tokens must be >= 1')
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) \
            or (args.top_k is not None and args.top_k < 1):
        raise SystemExit('need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 1')
    from checkpoint import check_device
    try:
        check_device(args.device)
    except ValueError as e:
        raise SystemExit(str(e))
    model, tok, chat_template = load_model(args.model, args.device, args.tokenizer, args.base)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.prompt is None:
        repl(model, tok, chat_template, args, generator)
        return
    messages = ([{'role': 'system', 'content': args.system}] if args.system else [])
    messages.append({'role': 'user', 'content': args.prompt})
    text, stopped = reply(model, tok, chat_template, messages, args, generator,
                          stream=not args.no_stream)
    if args.no_stream:
        print(text)
    if not stopped:
        print(f'(no end-of-turn token within {args.max_new_tokens} tokens)', file=sys.stderr)


if __name__ == '__main__':
    main()
