"""Export a checkpoint to a Hugging Face model directory.

    python export_hf.py out-demo/ckpt.pt out-demo/hf [--dtype bfloat16]

Writes config.json + model.safetensors (hf_interop.to_hf), generation_config.json (stops at
<|im_end|> and <|endoftext|>, pads with <|endoftext|>) and, when the checkpoint was trained with
the Qwen tokenizer (or a local HF tokenizer directory), the tokenizer files with a `chat_template`
that renders exactly the tokens training used (tokenizer.encode_conversation, 'chatml'):

    <|im_start|>{role}\\n{content}<|im_end|>\\n  per message, no default system prompt,
    add_generation_prompt -> <|im_start|>assistant\\n

so `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, tokenize=True)` gives our ids
and `AutoModelForCausalLM.from_pretrained(dir)` our logits. The directory appears complete or not
at all. Caveat of the HF path (not of this template): it tokenizes the rendered string, so a reply
starting with "\\n" merges into the header and text that spells a special token becomes that token.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

# Mirrors tokenizer._render for chat_template='chatml' (tool turns, tool calls, reasoning_content
# included), so the HF path and ours agree token for token on ordinary text.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user\\n' }}"
    "{%- else %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.role == 'assistant' and message.reasoning_content is defined"
    " and message.reasoning_content is not none %}"
    "{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- content }}{%- endif %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if loop.index0 > 0 or content %}{{- '\\n' }}{%- endif %}"
    "{%- set fn = tool_call.function if tool_call.function else tool_call %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}"
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def generation_config(tok_meta: dict, special: dict[str, int]) -> dict:
    im_end = tok_meta.get('im_end_id', special.get('<|im_end|>'))
    eot = tok_meta.get('pad_id', special.get('<|endoftext|>'))
    eos = [i for i in (im_end, eot) if i is not None]
    cfg = {'eos_token_id': eos if len(eos) > 1 else (eos[0] if eos else None),
           'pad_token_id': eot, 'do_sample': False}
    return {k: v for k, v in cfg.items() if v is not None}


def hf_tokenizer_for(tok_name: str | None, chat_template: str):
    """The transformers tokenizer to ship, or None when the source tokenizer is unknown."""
    from tokenizer import TiktokenChatTokenizer, load_tokenizer, to_hf_tokenizer
    if not tok_name:
        return None
    try:
        tok = load_tokenizer(tok_name)
    except ValueError:
        return None
    if isinstance(tok, TiktokenChatTokenizer):
        return to_hf_tokenizer(tok, chat_template=chat_template), tok
    hf = tok.hf  # a local HF tokenizer directory: ship it with our template
    hf.chat_template = chat_template
    return hf, tok


def export(ckpt_path: str, out_dir: str, dtype: str | None = None, tokenizer: str | None = None) -> str:
    from checkpoint import load_checkpoint
    from hf_interop import to_hf
    try:
        model, ckpt = load_checkpoint(ckpt_path, device='cpu')
    except ValueError as e:
        raise SystemExit(str(e))
    tok_meta = ckpt.get('tokenizer') or {}
    train_template = (ckpt.get('config') or {}).get('chat_template') or 'chatml'
    if train_template != 'chatml':
        print(f"warning: {ckpt_path} was trained with chat_template={train_template!r}; the exported "
              "chat_template is plain ChatML and matches it only for turns without <think> blocks",
              file=sys.stderr)
    out_dir = os.path.abspath(out_dir)
    stage = os.path.join(os.path.dirname(out_dir), f'.{os.path.basename(out_dir)}.export{os.getpid()}')
    shutil.rmtree(stage, ignore_errors=True)
    try:
        to_hf(model, stage, dtype=DTYPES[dtype] if dtype else None)
        built = hf_tokenizer_for(tokenizer or tok_meta.get('name') or 'qwen3', CHATML_TEMPLATE)
        special = dict(tok_meta.get('special_tokens') or {})
        if built is not None:
            hf_tok, tok = built
            if tok_meta.get('hash') and tok_meta['hash'] != tok.hash:
                raise SystemExit(f'{ckpt_path}: trained with tokenizer hash {tok_meta["hash"][:12]}, '
                                 f'but {tok.name} has {tok.hash[:12]}; pass --tokenizer')
            special = special or dict(tok.special_tokens)
            hf_tok.save_pretrained(stage)
        else:
            print(f'warning: tokenizer {tok_meta.get("name")!r} unknown here; exported without '
                  'tokenizer files', file=sys.stderr)
        with open(os.path.join(stage, 'generation_config.json'), 'w') as f:
            json.dump(generation_config(tok_meta, special), f, indent=2)
        if os.path.isdir(out_dir):
            # keep unrelated files a user put there; replace everything we write
            for name in os.listdir(stage):
                os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
            shutil.rmtree(stage)
        else:
            os.replace(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('ckpt', help='checkpoint written by train_sft.py (.pt, or a sharded checkpoint directory)')
    p.add_argument('out_dir', help='Hugging Face directory to write')
    p.add_argument('--dtype', choices=sorted(DTYPES), default=None,
                   help='weights dtype (default: as trained)')
    p.add_argument('--tokenizer', default=None, help="override: 'qwen3' or a tokenizer directory")
    args = p.parse_args(argv)
    out = export(args.ckpt, args.out_dir, args.dtype, args.tokenizer)
    print(f'wrote {out}: load with transformers.AutoModelForCausalLM.from_pretrained({out!r}) '
          f'and AutoTokenizer.from_pretrained({out!r})', file=sys.stderr)


if __name__ == '__main__':
    main()
