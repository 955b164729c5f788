"""Generation evals: greedy replies to a held-out set, scored for format and exact match.

    records = load_eval_records('data/demo/test.jsonl')           # DataError on bad input
    replies = generate_replies(model, tok, records, 'chatml', max_new_tokens=32, batch_size=64)
    counts = score_replies(records, replies); metrics(counts)      # {'format_compliance', 'accuracy', ...}
    held = load_held_out(path, ...); sharded_eval(model, held, batch_size, rank, world, all_reduce)

The one scoring code of nanoSFT: eval_sft.py (offline, any checkpoint) and train_sft.py (every
gen_eval_interval steps: sharded_eval, each rank a slice, counts summed over ranks) both call it.

Input: messages JSONL (an optional `reference` = the expected last reply, optional `task`), or
GSM8K JSONL (`question`/`answer`: the reference is the number after `####`). Other formats that
prepare_sft.py reads are scored on format only (no reference).
- format compliance: share of greedy replies that end with the chat format's end-of-turn token
  (<|im_end|>, <|eot_id|>, </s>, ...) within max_new_tokens;
- accuracy: exact match of the reply with `reference` after collapsing whitespace (GSM8K: the last
  number in the reply equals the #### number), over the conversations that have a reference; a reply
  cut off by max_new_tokens is wrong (its last number is no answer);
- cut off: share of replies that reached max_new_tokens before any stop token.
The prompt is the conversation up to (without) its last assistant reply, rendered as in training.
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
from dataclasses import dataclass

import torch

from chat_records import DataError, iter_records
from progress import Progress
from chat_format import encode_prompt, format_from_meta, get_format
from tokenizer import load_tokenizer

NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


def normalize(text: str) -> str:
    return ' '.join(text.split())


def to_number(s: str) -> float | None:
    try:
        return float(s.replace(',', ''))
    except ValueError:
        return None


def is_correct(reply: str, reference: str, numeric: bool) -> bool:
    if numeric:
        nums = NUMBER.findall(reply)
        want, got = to_number(reference), to_number(nums[-1]) if nums else None
        return want is not None and got is not None and abs(got - want) < 1e-6
    return normalize(reply) == normalize(reference)


def load_eval_records(path: str, limit: int | None = None) -> list[dict]:
    """-> [{'messages', 'reference' (str|None), 'numeric' (bool), 'task'}]; DataError `file:line:`.
    Records are read and checked by chat_records, as prepare_sft reads them: a record training
    would refuse (a role typo, a non-string content) is refused here too, not scored."""
    recs: list[dict] = []
    for where, msgs, rec, fmt in iter_records(path, raw=True):
        if fmt == 'gsm8k':
            ans = msgs[-1]['content']
            if '####' not in ans:
                raise DataError(f"{where}: GSM8K 'answer' has no '#### <number>'")
            recs.append({'messages': msgs, 'reference': ans.split('####')[-1].strip(), 'numeric': True,
                         'task': 'gsm8k'})
        else:  # `reference` and `task` are keys of the messages format; the others score format only
            extra = rec if fmt == 'messages' else {}
            ref = extra.get('reference')
            recs.append({'messages': msgs, 'reference': None if ref is None else str(ref),
                         'numeric': False, 'task': str(extra.get('task', 'all'))})
        if limit is not None and len(recs) >= limit:
            break
    return recs


def default_max_new_tokens(records, tok, block_size: int) -> int:
    """Room for the longest held-out reply (the last assistant message, as training encodes it) plus
    16 tokens, at most half the block: a limit shorter than the replies scores cut-off text."""
    longest = max((len(tok.encode(r['messages'][-1]['content'])) for r in records
                   if r['messages'][-1]['role'] == 'assistant'), default=240)
    return max(1, min(longest + 16, block_size // 2))


@torch.no_grad()
def generate_replies(model, tok, records, chat_template, max_new_tokens, batch_size, device=None,
                     progress: bool = True):
    """Greedy replies to every conversation's prompt, batched (similar lengths together) with the
    KV cache, rendered and stopped by the chat format (a name or a ChatFormat). -> list of (text,
    stopped at the format's end-of-turn token, cut off: max_new_tokens reached before any stop
    token)."""
    budget = model.config.block_size - max_new_tokens
    if budget <= 0:
        raise DataError(f'max_new_tokens {max_new_tokens} >= block_size {model.config.block_size}')
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
    bar = Progress(len(order), '  generate', 'conv', out=sys.stderr, enabled=progress)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        gen = model.generate([prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                             temperature=0.0, stop_ids=stops)
        for i, new in zip(idx, gen):
            stopped = bool(new) and new[-1] in stops
            text = fmt.answer(tok.decode(new[:-1] if stopped else new))   # qwen3: after its <think>
            out[i] = (text, stopped and new[-1] == fmt.end_id, not stopped)
        bar.update(len(idx))
    bar.close()
    return out


def score_replies(records, replies) -> dict:
    """-> counts: n, ended (replies that closed with the end-of-turn token), cut (cut off by max_new_tokens),
    with_reference, correct, per_task {task: [correct, with_reference]}, and per reply its verdict
    `correct_each` (None: no reference). Counts, not shares, so ranks that each scored a slice can
    sum them."""
    c = {'n': len(records), 'ended': 0, 'cut': 0, 'with_reference': 0, 'correct': 0, 'per_task': {},
         'correct_each': []}
    for r, (text, ended, cut) in zip(records, replies):
        c['ended'] += bool(ended)
        c['cut'] += bool(cut)
        ok = None
        if r['reference'] is not None:
            # a cut-off reply has no final answer: its last number is not one
            ok = not cut and is_correct(text, r['reference'], r['numeric'])
            c['with_reference'] += 1
            c['correct'] += ok
            t = c['per_task'].setdefault(r['task'], [0, 0])
            t[0] += ok
            t[1] += 1
        c['correct_each'].append(ok)
    return c


def metrics(counts: dict) -> dict:
    """Counts (of one process, or summed over ranks) -> format_compliance, cut_off, accuracy (None
    without references) and accuracy_per_task."""
    n, n_ref = counts['n'], counts['with_reference']
    return {'format_compliance': counts['ended'] / n if n else None,
            'cut_off': counts['cut'] / n if n else None,
            'accuracy': counts['correct'] / n_ref if n_ref else None,
            'accuracy_per_task': {k: v[0] / v[1] for k, v in sorted(counts['per_task'].items()) if v[1]}}


# ----------------------------------------------------------------------------------------------
# During training: every rank replies to a slice, the counts are summed

@dataclass
class HeldOut:
    """A held-out set with references and what renders it exactly as the training data."""
    path: str
    records: list
    tok: object
    chat_template: object   # the data's ChatFormat
    tasks: list
    max_new_tokens: int


def load_held_out(path: str, tok_meta: dict, block_size: int, max_new_tokens: int = 0,
                  limit: int | None = None) -> HeldOut:
    """The set checked up front: readable, with references (else accuracy means nothing), and the
    training data's tokenizer (tok_meta: meta.json's 'tokenizer', with its chat format) loadable
    here with the hash the data was prepared with. max_new_tokens=0: the default limit
    (default_max_new_tokens)."""
    records = load_eval_records(path, limit)
    if not any(r['reference'] is not None for r in records):
        raise DataError(f"gen_eval_data {path}: no conversation has a `reference` (or a GSM8K answer), so "
                        "accuracy cannot be measured; add references or turn gen_eval_data off")
    name = tok_meta.get('name') or 'qwen3'
    try:
        tok = load_tokenizer(name)
        fmt = format_from_meta(tok, tok_meta)
    except ValueError as e:
        raise DataError(f"gen_eval_data: cannot load the data's tokenizer or chat format to render "
                        f"prompts: {e}") from None
    if tok_meta.get('hash') and tok.hash != tok_meta['hash']:
        raise DataError(f"gen_eval_data: the tokenizer {name!r} found here (hash {tok.hash[:12]}) is not "
                        f"the one the data was prepared with (hash {tok_meta['hash'][:12]})")
    tasks = sorted({r['task'] for r in records if r['reference'] is not None})
    return HeldOut(path, records, tok, fmt, tasks,
                   max_new_tokens or default_max_new_tokens(records, tok, block_size))


@torch.no_grad()
def sharded_eval(model, held: HeldOut, batch_size: int, rank: int = 0, world: int = 1,
                 all_reduce=lambda t: t, fsdp: bool = False) -> dict:
    """Greedy replies to held.records[rank::world] and their scores summed over ranks (every rank
    must call it: the sum is a collective), so every rank gets the same metrics and takes the same
    decisions on them. -> metrics + correct, with_reference, a sample (the reply to the first
    conversation, which rank 0 always holds) and gen_eval_s (seconds)."""
    t0 = time.time()
    mine = held.records[rank::world]
    model.eval()
    with fsdp_unsharded(model) if fsdp else contextlib.nullcontext():
        replies = generate_replies(model, held.tok, mine, held.chat_template, held.max_new_tokens,
                                   batch_size, progress=False) if mine else []
    model.train()
    c = score_replies(mine, replies)
    keys = ('n', 'ended', 'cut', 'with_reference', 'correct')
    vec = [c[k] for k in keys]
    for t in held.tasks:
        vec += c['per_task'].get(t, [0, 0])
    device = next(model.parameters()).device
    total = [int(v) for v in all_reduce(torch.tensor(vec, dtype=torch.float64, device=device)).tolist()]
    summed = dict(zip(keys, total))
    summed['per_task'] = {t: total[len(keys) + 2 * k:len(keys) + 2 * k + 2] for k, t in enumerate(held.tasks)}
    first = held.records[0]['messages']
    prompt = first[:-1] if first[-1]['role'] == 'assistant' else first
    sample = {'prompt': prompt[-1]['content'] if prompt else '', 'reply': replies[0][0] if replies else None,
              'reference': held.records[0]['reference']}
    return {**metrics(summed), 'correct': summed['correct'], 'with_reference': summed['with_reference'],
            'sample': sample, 'gen_eval_s': time.time() - t0}


class fsdp_unsharded:
    """FSDP2 keeps each rank's shard of the weights and gathers a block's only inside its forward,
    and generation calls the blocks step by step, a different number of times on each rank: gather
    every parameter group once (a collective all ranks run), generate locally, shard again."""

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.model = model
        self.groups = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        # FSDP initializes its state in the first forward through the root module; generation
        # enters at the blocks, so one token goes through the root first (every rank, same calls).
        device = next(self.model.parameters()).device
        self.model(torch.zeros(1, 1, dtype=torch.long, device=device))
        for m in self.groups:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()

    def __exit__(self, *exc):
        for m in self.groups:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
