"""Held-out evaluation of one or more checkpoints: masked loss, format compliance, accuracy.

    python eval_sft.py data/demo/test.jsonl out-demo/base.pt out-demo/ckpt.pt --labels base sft \\
        --out out-demo/eval.json

Input: messages JSONL (an optional `reference` = the expected last reply, optional `task`), or
GSM8K JSONL (`question`/`answer`: the reference is the number after `####`). Other formats that
prepare_sft.py reads are scored on loss and format only.

Metrics per checkpoint:
- val loss / perplexity: mean cross-entropy over the trained (assistant) tokens of the whole file,
  token-weighted, with exactly the tokens and masks training uses (chat_format.encode_conversation);
- format compliance: share of greedy replies that end with the format's end-of-turn token (<|im_end|>,
  <|eot_id|>, </s>, ...) within --max_new_tokens;
- accuracy: exact match of the reply with `reference` after collapsing whitespace (GSM8K: the last
  number in the reply equals the #### number), over the conversations that have a reference.
The prompt for generation is the conversation up to (without) its last assistant reply.
Writes a JSON report (atomically) and prints a markdown table, one row per checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch
from progress import Progress

NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


def normalize(text: str) -> str:
    return ' '.join(text.split())


def to_number(s: str) -> float | None:
    try:
        return float(s.replace(',', ''))
    except ValueError:
        return None


def load_eval_records(path: str, limit: int | None = None) -> list[dict]:
    """-> [{'messages', 'reference' (str|None), 'numeric' (bool), 'task'}]."""
    recs: list[dict] = []
    try:
        f = open(path, encoding='utf-8')
    except OSError as e:
        raise SystemExit(f'{path}: cannot read: {e.strerror}')
    with f:
        first = f.read(1)
        f.seek(0)
        if first == '[':  # a JSON array: leave the formats to prepare_sft's reader
            return _via_prepare(path, limit)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f'{path}:{lineno}: not valid JSON ({e.msg})')
            if not isinstance(rec, dict):
                raise SystemExit(f'{path}:{lineno}: expected a JSON object per line')
            if 'question' in rec and 'answer' in rec:
                ans = str(rec['answer'])
                if '####' not in ans:
                    raise SystemExit(f"{path}:{lineno}: GSM8K 'answer' has no '#### <number>'")
                recs.append({'messages': [{'role': 'user', 'content': str(rec['question'])},
                                          {'role': 'assistant', 'content': ans}],
                             'reference': ans.split('####')[-1].strip(), 'numeric': True,
                             'task': 'gsm8k'})
            elif 'messages' in rec:
                msgs = rec['messages']
                if (not isinstance(msgs, list) or not msgs
                        or not all(isinstance(m, dict) and 'role' in m and 'content' in m for m in msgs)):
                    raise SystemExit(f"{path}:{lineno}: 'messages' must be a non-empty list of "
                                     '{role, content} objects')
                ref = rec.get('reference')
                recs.append({'messages': msgs, 'reference': None if ref is None else str(ref),
                             'numeric': False, 'task': str(rec.get('task', 'all'))})
            else:
                return _via_prepare(path, limit)
            if limit is not None and len(recs) >= limit:
                break
    if not recs:
        raise SystemExit(f'{path}: no conversations')
    return recs


def _via_prepare(path: str, limit: int | None) -> list[dict]:
    from chat_records import load_records
    try:
        convs = load_records(path)
    except ValueError as e:
        raise SystemExit(str(e))
    convs = convs[:limit] if limit is not None else convs
    return [{'messages': m, 'reference': None, 'numeric': False, 'task': 'all'} for m in convs]


def is_correct(reply: str, reference: str, numeric: bool) -> bool:
    if numeric:
        nums = NUMBER.findall(reply)
        want, got = to_number(reference), to_number(nums[-1]) if nums else None
        return want is not None and got is not None and abs(got - want) < 1e-6
    return normalize(reply) == normalize(reference)


@torch.no_grad()
def masked_loss(model, tok, records, chat_template, batch_size, device) -> tuple[float, int, int]:
    """-> (summed loss over trained tokens, trained tokens, truncated conversations)."""
    from chat_format import encode_conversation
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


@torch.no_grad()
def generate_replies(model, tok, records, chat_template, max_new_tokens, batch_size, device):
    """Greedy replies to every conversation's prompt. -> list of (text, stopped at the format's
    end-of-turn token, cut off: max_new_tokens reached before any stop token)."""
    from chat_format import encode_prompt, get_format
    budget = model.config.block_size - max_new_tokens
    if budget <= 0:
        raise SystemExit(f'--max_new_tokens {max_new_tokens} >= block_size {model.config.block_size}')
    prompts = []
    for r in records:
        msgs = r['messages']
        if msgs[-1]['role'] == 'assistant':
            msgs = msgs[:-1]
        ids = encode_prompt(msgs, tok, chat_template=chat_template)
        prompts.append(ids[-budget:])  # keeps the question and generation prompt when too long
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    fmt = get_format(chat_template, tok)
    stops = fmt.stop_ids
    bar = Progress(len(order), '  generate', 'conv', out=sys.stderr)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        gen = model.generate([prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                             temperature=0.0, stop_ids=stops)
        for i, new in zip(idx, gen):
            stopped = bool(new) and new[-1] in stops
            out[i] = (tok.decode(new[:-1] if stopped else new), stopped and new[-1] == fmt.end_id,
                      not stopped)
        bar.update(len(idx))
    bar.close()
    return out


def default_max_new_tokens(records, tok, block_size: int) -> int:
    """Room for the longest held-out reply (the last assistant message, as training encodes it) plus
    16 tokens, at most half the block: a limit shorter than the replies scores cut-off text."""
    longest = max((len(tok.encode(r['messages'][-1]['content'])) for r in records
                   if r['messages'][-1]['role'] == 'assistant'), default=240)
    return max(1, min(longest + 16, block_size // 2))


def evaluate(model_path, records, args, label=None) -> dict:
    from sample_sft import load_model
    model, tok, chat_template = load_model(model_path, args.device, args.tokenizer)
    max_new = args.max_new_tokens or default_max_new_tokens(records, tok, model.config.block_size)
    loss_sum, n_tok, truncated = masked_loss(model, tok, records, chat_template,
                                             args.batch_size, args.device)
    replies = generate_replies(model, tok, records, chat_template, max_new, args.batch_size, args.device)
    n_cut = sum(cut for _, _, cut in replies)
    if n_cut > len(replies) / 2:
        print(f'warning: {n_cut} of {len(replies)} replies reached --max_new_tokens {max_new} before '
              f'ending: format compliance and accuracy measure cut-off text; raise --max_new_tokens',
              file=sys.stderr)
    per_task: dict[str, list[int]] = {}
    samples = []
    n_ref = n_ok = 0
    for r, (text, ended, cut) in zip(records, replies):
        ok = None
        if r['reference'] is not None:
            # a cut-off reply has no final answer: its last number is not one
            ok = not cut and is_correct(text, r['reference'], r['numeric'])
            n_ref += 1
            n_ok += ok
            t = per_task.setdefault(r['task'], [0, 0])
            t[0] += ok
            t[1] += 1
        if len(samples) < args.n_samples:
            samples.append({'prompt': r['messages'][-2]['content'] if len(r['messages']) > 1
                            else r['messages'][-1]['content'],
                            'reply': text, 'ended_with_im_end': ended, 'cut_off': cut,
                            'reference': r['reference'], 'correct': ok})
    val_loss = loss_sum / n_tok if n_tok else float('nan')
    return {
        'model': model_path, 'label': label or model_path,
        'n': len(records), 'trained_tokens': n_tok, 'truncated': truncated,
        'val_loss': val_loss, 'perplexity': math.exp(min(val_loss, 50)) if n_tok else float('nan'),
        'format_compliance': sum(e for _, e, _ in replies) / len(replies),
        'cut_off': n_cut / len(replies), 'max_new_tokens': max_new,
        'accuracy': n_ok / n_ref if n_ref else None, 'n_with_reference': n_ref,
        'accuracy_per_task': {k: v[0] / v[1] for k, v in sorted(per_task.items())},
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
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


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
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.models):
        raise SystemExit(f'--labels: {len(args.labels)} labels for {len(args.models)} models')
    if args.limit is not None and args.limit < 1:
        raise SystemExit('--limit must be >= 1')
    args.n_samples = max(args.n_samples, args.show)
    records = load_eval_records(args.data, args.limit)
    results = []
    for k, path in enumerate(args.models):
        label = args.labels[k] if args.labels else None
        print(f'evaluating {label or path} on {len(records)} conversations from {args.data}',
              file=sys.stderr)
        res = evaluate(path, records, args, label)
        for s in res['samples'][:args.show]:
            mark = '' if s['correct'] is None else (' ok' if s['correct'] else f" (want {s['reference']!r})")
            print(f"  {s['prompt']!r} -> {s['reply']!r}{'' if s['ended_with_im_end'] else ' [no end-of-turn token]'}{mark}",
                  file=sys.stderr)
        results.append(res)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.models[-1])), 'eval.json')
    write_json(out, {'data': args.data, 'results': results})
    print(markdown_table(results))
    print(f'\nwrote {out}', file=sys.stderr)


if __name__ == '__main__':
    main()
