"""Export a checkpoint to a Hugging Face model directory (or, for a LoRA checkpoint, a PEFT adapter).

    python export_hf.py out-demo/ckpt.pt out-demo/hf [--dtype bfloat16]
    python export_hf.py out-lora/ckpt.pt out-lora/hf            # LoRA: adapters merged into the base
    python export_hf.py out-lora/ckpt.pt out-lora/adapter --peft    # LoRA: a PEFT adapter directory

A LoRA checkpoint is merged in fp32 into exactly the base it was trained on (QLoRA: the dequantized
NF4 base, not the original weights), so transformers computes what the adapter model computed. With
--peft it becomes adapter_config.json + adapter_model.safetensors that
`peft.PeftModel.from_pretrained(base, dir)` loads onto the Hugging Face base.

Writes config.json + model.safetensors (hf_interop.to_hf), generation_config.json (eos = the chat
format's stop ids, pad = the tokenizer's pad id) and the tokenizer files with the chat template the
model was trained with (the format recorded in the checkpoint, chat_format.py): the family's
template from chat_templates/ for a built-in format, the source directory's own template for the
general path ('hf'). The Qwen3 tokenizer is written as a fast tokenizer; a directory tokenizer is
copied (tokenizer.json, tokenizer_config.json, special_tokens_map.json) with chat_template.jinja
replaced. So `AutoTokenizer.from_pretrained(dir).apply_chat_template(history,
add_generation_prompt=True)` gives the very prompt ids training put in front of each reply, and
`AutoModelForCausalLM.from_pretrained(dir)` our logits. The directory appears complete or not at
all. An existing one is replaced whole, so no file of an earlier export survives (an adapter left
beside a merged model would be applied to it by transformers); one that holds files an export does
not write is refused, so nothing of the user's is deleted. Caveat of the HF path (not of these
templates): it tokenizes the rendered string, so a reply starting with whitespace and "\\n" merges
into the header and text that spells a special token becomes that token (unless
apply_chat_template(..., sanitize_control_tokens=True)).
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
# everything an export writes: a directory holding only these is an earlier export, safe to replace
EXPORT_FILES = {'config.json', 'model.safetensors', 'model.safetensors.index.json', 'generation_config.json',
                'adapter_config.json', 'adapter_model.safetensors', 'chat_template.jinja', *TOKENIZER_FILES}


def check_out_dir(out_dir: str) -> None:
    """Refuse an out_dir the export would not simply replace: a file, or a directory holding files
    that are not from an export (replacing it would delete them)."""
    if os.path.isdir(out_dir):
        foreign = sorted(set(os.listdir(out_dir)) - EXPORT_FILES)
        if foreign:
            raise SystemExit(f'{out_dir}: holds files an export does not write ({", ".join(foreign[:5])}'
                             f'{" ..." if len(foreign) > 5 else ""}); an export replaces the whole directory: '
                             'choose a new or empty one, or move those files out')
    elif os.path.lexists(out_dir):
        raise SystemExit(f'{out_dir}: exists and is not a directory')


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


def export(ckpt_path: str, out_dir: str, dtype: str | None = None, tokenizer: str | None = None,
           peft: bool = False, base: str | None = None) -> str:
    from checkpoint import base_source, load_checkpoint
    from hf_interop import to_hf
    from lora import merge_lora, save_peft_adapter
    from tokenizer import load_tokenizer
    out_dir = os.path.realpath(out_dir)   # a symlink: replace the directory it points at, keep the link
    check_out_dir(out_dir)
    if tokenizer:   # asked for by name: fail now, not after loading the model
        try:
            load_tokenizer(tokenizer)
        except ValueError as e:
            raise SystemExit(f'--tokenizer {tokenizer}: {e}')
    try:
        model, ckpt = load_checkpoint(ckpt_path, device='cpu', base=base_source(base) if base else None)
    except ValueError as e:
        raise SystemExit(str(e))
    lora = getattr(model, 'lora_config', None)
    if peft and lora is None:
        raise SystemExit(f'{ckpt_path}: --peft exports the adapters of a LoRA checkpoint; this one is a '
                         f'full model (export it without --peft)')
    tok_meta = ckpt.get('tokenizer') or {}
    tok = fmt = None
    try:
        from chat_format import format_from_meta
        tok = load_tokenizer(tokenizer or tok_meta.get('name') or 'qwen3')
        fmt = format_from_meta(tok, tok_meta, (ckpt.get('config') or {}).get('chat_template') or 'chatml')
    except ValueError as e:
        if tokenizer:
            raise SystemExit(f'--tokenizer {tokenizer}: {e}')
        print(f'warning: tokenizer {tok_meta.get("name")!r} unusable here ({e}); exported without '
              'tokenizer files', file=sys.stderr)
        tok = fmt = None
    if tok is not None and tok_meta.get('hash') and tok_meta['hash'] != tok.hash:
        raise SystemExit(f'{ckpt_path}: trained with tokenizer hash {tok_meta["hash"][:12]}, '
                         f'but {tok.name} has {tok.hash[:12]}; pass --tokenizer')
    stage = os.path.join(os.path.dirname(out_dir), f'.{os.path.basename(out_dir)}.export{os.getpid()}')
    old = stage + '.old'
    shutil.rmtree(stage, ignore_errors=True)
    try:
        if peft:
            src = base_source(base) if base else (ckpt.get('base') or {}).get('source') or ''
            hf_base = src[3:] if src.startswith('hf:') else None
            if lora.quantize:
                print(f"warning: {ckpt_path} was trained on the NF4-quantized base: these adapters reproduce "
                      "training exactly only on that base; the merged export (without --peft) is exact",
                      file=sys.stderr)
            if hf_base is None:
                print(f"note: the base {src} is a nanoSFT checkpoint: export it too (export_hf.py {src} DIR) "
                      "and load the adapter onto that directory", file=sys.stderr)
            try:
                save_peft_adapter(model, stage, base_model_name_or_path=hf_base,
                                  dtype=DTYPES[dtype] if dtype else None)
            except ValueError as e:   # an architecture with no Hugging Face twin
                raise SystemExit(f'{ckpt_path}: {e}')
        else:
            if lora is not None:
                model = merge_lora(model)   # fp32, on the base the adapters were trained on
            to_hf(model, stage, dtype=DTYPES[dtype] if dtype else None)
        if fmt is not None:
            write_tokenizer(tok, fmt.template, stage)
        if not peft:
            with open(os.path.join(stage, 'generation_config.json'), 'w') as f:
                json.dump(generation_config(tok_meta, tok, fmt), f, indent=2)
        check_out_dir(out_dir)   # again: files may have appeared there while we wrote
        if os.path.isdir(out_dir):
            # swapped whole, not merged: a stale adapter_config.json beside a merged model would
            # make transformers apply the old adapter to it
            os.replace(out_dir, old)
            try:
                os.replace(stage, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out_dir)
    except OSError as e:   # disk full, no permission, a file where a parent directory should be
        raise SystemExit(f'{out_dir}: cannot write the export: {e}')
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('ckpt', help='checkpoint written by train_sft.py (.pt, or a sharded checkpoint directory)')
    p.add_argument('out_dir', help='Hugging Face directory to write; an existing one is replaced whole '
                   '(refused if it holds files an export does not write)')
    p.add_argument('--dtype', choices=sorted(DTYPES), default=None,
                   help='weights dtype (default: as trained)')
    p.add_argument('--tokenizer', default=None,
                   help="override: 'qwen3' or a tokenizer directory (an error if unusable)")
    p.add_argument('--peft', action='store_true',
                   help='LoRA checkpoint: write a PEFT adapter directory instead of a merged model')
    p.add_argument('--base', default=None,
                   help="LoRA checkpoint: its base ('hf:/dir' or ckpt.pt), when it moved since training")
    args = p.parse_args(argv)
    out = export(args.ckpt, args.out_dir, args.dtype, args.tokenizer, args.peft, args.base)
    if args.peft:
        print(f'wrote {out}: load with peft.PeftModel.from_pretrained(<the base model>, {out!r})',
              file=sys.stderr)
    else:
        print(f'wrote {out}: load with transformers.AutoModelForCausalLM.from_pretrained({out!r}) '
              f'and AutoTokenizer.from_pretrained({out!r})', file=sys.stderr)


if __name__ == '__main__':
    main()
