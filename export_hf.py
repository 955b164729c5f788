"""Export a checkpoint to a Hugging Face model directory.

    python export_hf.py out-demo/ckpt.pt out-demo/hf [--dtype bfloat16]

Writes config.json + model.safetensors (hf_interop.to_hf), generation_config.json (eos = the chat
format's stop ids, pad = the tokenizer's pad id) and the tokenizer files with the chat template the
model was trained with (the format recorded in the checkpoint, chat_format.py): the family's
template from chat_templates/ for a built-in format, the source directory's own template for the
general path ('hf'). The Qwen3 tokenizer is written as a fast tokenizer; a directory tokenizer is
copied (tokenizer.json, tokenizer_config.json, special_tokens_map.json) with chat_template.jinja
replaced. So `AutoTokenizer.from_pretrained(dir).apply_chat_template(history,
add_generation_prompt=True)` gives the very prompt ids training put in front of each reply, and
`AutoModelForCausalLM.from_pretrained(dir)` our logits. The directory appears complete or not at
all. Caveat of the HF path (not of these templates): it tokenizes the rendered string, so a reply
starting with whitespace and "\\n" merges into the header and text that spells a special token
becomes that token (unless apply_chat_template(..., sanitize_control_tokens=True)).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def generation_config(tok_meta: dict, tok=None, fmt=None) -> dict:
    """Stops at the format's end-of-turn token and the tokenizer's other stop ids."""
    if fmt is not None:
        eos, pad, bos = list(fmt.stop_ids), tok.pad_id, tok.bos_id
    else:   # the tokenizer is not available here: what the checkpoint recorded
        special = tok_meta.get('special_tokens') or {}
        eos = (tok_meta.get('chat_format') or {}).get('stop_ids') or [
            i for i in (tok_meta.get('im_end_id', special.get('<|im_end|>')),
                        tok_meta.get('pad_id', special.get('<|endoftext|>'))) if i is not None]
        pad, bos = tok_meta.get('pad_id', special.get('<|endoftext|>')), tok_meta.get('bos_id')
    cfg = {'eos_token_id': eos if len(eos) > 1 else (eos[0] if eos else None),
           'pad_token_id': pad, 'bos_token_id': bos, 'do_sample': False}
    return {k: v for k, v in cfg.items() if v is not None}


TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


def write_tokenizer(tok, template: str, out: str) -> None:
    """The tokenizer files with `template` as the chat template (chat_template.jinja)."""
    from tokenizer import to_hf_tokenizer
    if tok.source_dir is None:   # the built-in Qwen3 tokenizer
        to_hf_tokenizer(tok, chat_template=template).save_pretrained(out)
        return
    for name in TOKENIZER_FILES:
        src = os.path.join(tok.source_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, name))
    config_path = os.path.join(out, 'tokenizer_config.json')
    config = {}
    if os.path.exists(config_path):
        with open(config_path, encoding='utf-8') as f:
            config = json.load(f)
    config.pop('chat_template', None)   # chat_template.jinja is the one transformers reads
    with open(config_path, 'w', encoding='utf-8') as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, 'chat_template.jinja'), 'w', encoding='utf-8') as f:
        f.write(template)


def export(ckpt_path: str, out_dir: str, dtype: str | None = None, tokenizer: str | None = None) -> str:
    from checkpoint import load_checkpoint
    from hf_interop import to_hf
    try:
        model, ckpt = load_checkpoint(ckpt_path, device='cpu')
    except ValueError as e:
        raise SystemExit(str(e))
    tok_meta = ckpt.get('tokenizer') or {}
    tok = fmt = None
    try:
        from chat_format import format_from_meta
        from tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer or tok_meta.get('name') or 'qwen3')
        fmt = format_from_meta(tok, tok_meta, (ckpt.get('config') or {}).get('chat_template') or 'chatml')
    except ValueError as e:
        print(f'warning: tokenizer {tok_meta.get("name")!r} unusable here ({e}); exported without '
              'tokenizer files', file=sys.stderr)
        tok = fmt = None
    if tok is not None and tok_meta.get('hash') and tok_meta['hash'] != tok.hash:
        raise SystemExit(f'{ckpt_path}: trained with tokenizer hash {tok_meta["hash"][:12]}, '
                         f'but {tok.name} has {tok.hash[:12]}; pass --tokenizer')
    out_dir = os.path.abspath(out_dir)
    stage = os.path.join(os.path.dirname(out_dir), f'.{os.path.basename(out_dir)}.export{os.getpid()}')
    shutil.rmtree(stage, ignore_errors=True)
    try:
        to_hf(model, stage, dtype=DTYPES[dtype] if dtype else None)
        if fmt is not None:
            write_tokenizer(tok, fmt.template, stage)
        with open(os.path.join(stage, 'generation_config.json'), 'w') as f:
            json.dump(generation_config(tok_meta, tok, fmt), f, indent=2)
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
    p.add_argument('ckpt', help='checkpoint .pt written by train_sft.py')
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
