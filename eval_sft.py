"""Held-out evaluation of one or more checkpoints: masked loss, format compliance, accuracy.

    python eval_sft.py data/demo/test.jsonl out-demo/base.pt out-demo/ckpt.pt --labels base sft \\
        --out out-demo/eval.json

Input: messages JSONL (an optional `reference` = the expected last reply, optional `task`), or
GSM8K JSONL (`question`/`answer`: the reference is the number after `####`). Other formats that
prepare_sft.py reads are scored on loss and format only.

Metrics per checkpoint:
- val loss / perplexity: mean cross-entropy over the trained (assistant) tokens of the whole file,
  token-weighted, with exactly the tokens and masks training uses (chat_format.encode_conversation);
- format compliance (replies that end with the format's end-of-turn token: <|im_end|>, <|eot_id|>,
  </s>, ...), accuracy and the share cut off by --max_new_tokens: greedy replies scored by
  gen_eval.py (the same code train_sft.py runs every gen_eval_interval steps): see there.
Writes a JSON report (atomically) and prints a markdown table, one row per checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from chat_format import encode_conversation
from chat_records import DataError
from checkpoint import check_device
from gen_eval import default_max_new_tokens, generate_replies, load_eval_records, metrics, score_replies
from progress import Progress, check_out_file


@torch.no_grad()
def masked_loss(model, tok, records, chat_template, batch_size, device) -> tuple[float, int, int]:
    """-> (summed loss over trained tokens, trained tokens, truncated conversations)."""
    block = model.config.block_size
    encoded, truncated = [], 0
    for r in records:
        ids, labels = encode_conversation(r['messages'], tok, chat_template=chat_template)
        if len(ids) > block:
            ids, labels, truncated = ids[:block], labels[:block], truncated + 1
        encoded.append((ids, labels))
    encoded.sort(key=lambda e: len(e[0]))  # similar lengths per batch: little padding
    total, count = 0.0, 0
    bar = Progress(len(encoded), '  loss', 'conv', out=sys.stderr)
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        bar.update(len(chunk))
        T = max(len(e[0]) for e in chunk)
        x = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        y = torch.full((len(chunk), T), -100, dtype=torch.long)
        for j, (ids, labels) in enumerate(chunk):
            x[j, :len(ids)] = torch.tensor(ids)
            y[j, :len(labels)] = torch.tensor(labels)
        n = int((y[:, 1:] != -100).sum())  # labels are shifted inside the model
        if n == 0:
            continue
        _, loss = model(x.to(device), labels=y.to(device), reduction='sum')
        total += float(loss)
        count += n
    bar.close()
    return total, count, truncated


def evaluate(model_path, records, args, label=None) -> dict:
    from sample_sft import load_model
    model, tok, chat_template = load_model(model_path, args.device, args.tokenizer, getattr(args, 'base', None))
    max_new = args.max_new_tokens or default_max_new_tokens(records, tok, model.config.block_size)
    loss_sum, n_tok, truncated = masked_loss(model, tok, records, chat_template,
                                             args.batch_size, args.device)
    replies = generate_replies(model, tok, records, chat_template, max_new, args.batch_size, args.device)
    counts = score_replies(records, replies)
    if counts['cut'] > len(replies) / 2:
        print(f"warning: {counts['cut']} of {len(replies)} replies reached --max_new_tokens {max_new} before "
              f"ending: format compliance and accuracy measure cut-off text; raise --max_new_tokens",
              file=sys.stderr)
    samples = []
    for r, (text, ended, cut), ok in zip(records, replies, counts['correct_each']):
        if len(samples) >= args.n_samples:
            break
        samples.append({'prompt': r['messages'][-2]['content'] if len(r['messages']) > 1
                        else r['messages'][-1]['content'],
                        'reply': text, 'ended_with_im_end': ended, 'cut_off': cut,
                        'reference': r['reference'], 'correct': ok})
    val_loss = loss_sum / n_tok if n_tok else float('nan')
    return {
        'model': model_path, 'label': label or model_path,
        'n': len(records), 'trained_tokens': n_tok, 'truncated': truncated,
        'val_loss': val_loss, 'perplexity': math.exp(min(val_loss, 50)) if n_tok else float('nan'),
        **metrics(counts), 'max_new_tokens': max_new, 'n_with_reference': counts['with_reference'],
        'samples': samples,
    }


def markdown_table(results: list[dict]) -> str:
    pct = lambda v: '-' if v is None else f'{100 * v:.1f}%'
    rows = ['| model | val loss | perplexity | format compliance | accuracy | cut off |',
            '|---|---:|---:|---:|---:|---:|']
    for r in results:
        rows.append(f"| {r['label']} | {r['val_loss']:.3f} | {r['perplexity']:.2f} | "
                    f"{pct(r['format_compliance'])} | {pct(r['accuracy'])} | {pct(r['cut_off'])} |")
    tasks = sorted({t for r in results for t in r['accuracy_per_task']})
    if len(tasks) > 1:
        rows += ['', '| accuracy per task | ' + ' | '.join(tasks) + ' |',
                 '|---|' + '---:|' * len(tasks)]
        for r in results:
            rows.append(f"| {r['label']} | " + ' | '.join(pct(r['accuracy_per_task'].get(t))
                                                         for t in tasks) + ' |')
    return '\n'.join(rows)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a failed write leaves no half-written report behind
            os.remove(tmp)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('data', help='held-out JSONL (messages with optional reference, or GSM8K)')
    p.add_argument('models', nargs='+', help='checkpoints (.pt) and/or Hugging Face directories')
    p.add_argument('--labels', nargs='*', default=None, help='a name per model for the table')
    p.add_argument('--out', default=None, help='JSON report path (default: eval.json next to the '
                                               'last model)')
    p.add_argument('--limit', type=int, default=None, help='first N conversations only')
    p.add_argument('--max_new_tokens', type=int, default=None,
                   help='reply length limit (default: the longest held-out reply + 16 tokens, at '
                        'most half the block); replies cut off by it count as wrong and are reported')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--n_samples', type=int, default=5, help='replies kept in the JSON per model')
    p.add_argument('--show', type=int, default=0, help='print this many prompts and replies')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--tokenizer', default=None, help="override: 'qwen3' or a tokenizer directory")
    p.add_argument('--base', default=None,
                   help="LoRA checkpoints: their base ('hf:/dir' or ckpt.pt), when it moved since training")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.models):
        raise SystemExit(f'--labels: {len(args.labels)} labels for {len(args.models)} models')
    if args.limit is not None and args.limit < 1:
        raise SystemExit('--limit must be >= 1')
    if args.batch_size < 1:
        raise SystemExit('--batch_size must be >= 1')
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SystemExit('--max_new_tokens must be >= 1')
    try:
        check_device(args.device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.models[-1])), 'eval.json')
    try:
        check_out_file(out, 'eval.json')   # before the evaluation, not after it
    except ValueError as e:
        raise SystemExit(str(e)) from None
    args.n_samples = max(args.n_samples, args.show)
    try:
        records = load_eval_records(args.data, args.limit)
    except DataError as e:
        raise SystemExit(str(e)) from None
    results = []
    for k, path in enumerate(args.models):
        label = args.labels[k] if args.labels else None
        print(f'evaluating {label or path} on {len(records)} conversations from {args.data}',
              file=sys.stderr)
        try:
            res = evaluate(path, records, args, label)
        except DataError as e:
            raise SystemExit(str(e)) from None
        for s in res['samples'][:args.show]:
            mark = '' if s['correct'] is None else (' ok' if s['correct'] else f" (want {s['reference']!r})")
            print(f"  {s['prompt']!r} -> {s['reply']!r}{'' if s['ended_with_im_end'] else ' [no end-of-turn token]'}{mark}",
                  file=sys.stderr)
        results.append(res)
    write_json(out, {'data': args.data, 'results': results})
    print(markdown_table(results))
    print(f'\nwrote {out}', file=sys.stderr)


if __name__ == '__main__':
    main()
