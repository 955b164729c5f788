"""Generate the bundled demo conversations: a multi-task chat set with checkable short answers.

    python data/make_demo_data.py --out_dir data/demo --seed 1337 --n_train 4000 --n_test 300

Writes `train.jsonl` and `test.jsonl` in `messages` format. Every record also carries `task` and
`reference` (the exact expected text of the last assistant reply), which eval_sft.py scores by exact
match. Replies are short and formulaic on purpose: the demo model is tiny and trains for a few
minutes on a CPU, so the point is to show it learning the chat format, the tasks and when to stop,
not world knowledge. Nothing is downloaded; the same seed always gives the same files.

It also writes `tokenizer/`, a small byte-level BPE tokenizer (Hugging Face format, Qwen's
pre-tokenizer and ChatML special tokens, --vocab_size tokens at most) learned from the training
text. Why: with Qwen's 151,936-token vocabulary the embedding and LM head would be 98% of the
demo's 4-layer model and most of its CPU time. `make demo` passes `--tokenizer data/demo/tokenizer`
to prepare_sft.py; every other step is the same as with the Qwen tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten',
         'eleven', 'twelve', 'thirteen', 'fourteen', 'fifteen', 'sixteen', 'seventeen', 'eighteen',
         'nineteen', 'twenty']
ITEMS = ['apple', 'pear', 'plum', 'cat', 'dog', 'cup', 'pen', 'book', 'hat', 'key', 'box', 'car']
UNITS = [('km', 'm', 1000), ('m', 'cm', 100), ('kg', 'g', 1000), ('h', 'min', 60), ('min', 's', 60)]
SYS_WORDS = 'Answer in words.'
SYS_JSON = 'Reply with JSON.'
SYS_PLAIN = ['You are a helpful assistant.', 'Be brief.', 'You are a concise math tutor.']


def number_reply(value: int, system: str | None) -> str:
    """The one place the answer format depends on the system prompt."""
    if system == SYS_WORDS and 0 <= value < len(WORDS):
        return WORDS[value]
    if system == SYS_JSON:
        return json.dumps({'answer': value})
    return str(value)


def task_add(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    q = rng.choice(['What is {a} + {b}?', 'Add {a} and {b}.', 'Compute {a} + {b}.', '{a} + {b} = ?'])
    return q.format(a=a, b=b), a + b


def task_sub(rng):
    a = rng.randint(0, 18)
    b = rng.randint(0, min(a, 9))
    q = rng.choice(['What is {a} - {b}?', 'Subtract {b} from {a}.', 'Compute {a} - {b}.'])
    return q.format(a=a, b=b), a - b


def task_count(rng):
    n = rng.randint(1, 6)
    items = [rng.choice(ITEMS) for _ in range(n)]
    q = rng.choice(['How many items are in this list: {l}?', 'Count the items: {l}.'])
    return q.format(l=', '.join(items)), n


def task_reverse(rng):
    xs = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
    q = rng.choice(['Reverse the list: {l}', 'Write this list backwards: {l}'])
    return q.format(l=' '.join(xs)), ' '.join(reversed(xs))


def task_sort(rng):
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    q = rng.choice(['Sort the list: {l}', 'Sort these numbers from small to large: {l}'])
    return q.format(l=' '.join(map(str, xs))), ' '.join(map(str, sorted(xs)))


def task_convert(rng):
    src, dst, factor = rng.choice(UNITS)
    v = rng.randint(1, 9)
    q = rng.choice(['Convert {v} {s} to {d}.', 'How many {d} are in {v} {s}?'])
    return q.format(v=v, s=src, d=dst), f'{v * factor} {dst}'


NUMBER_TASKS = {'add': task_add, 'sub': task_sub, 'count': task_count}
TEXT_TASKS = {'reverse': task_reverse, 'sort': task_sort, 'convert': task_convert}
FOLLOW_UPS = [('Now double it.', lambda v: 2 * v), ('Now add 1.', lambda v: v + 1),
              ('Now subtract 1.', lambda v: v - 1)]


def make_example(rng: random.Random) -> dict:
    kind = rng.choice(['add', 'sub', 'count', 'reverse', 'sort', 'convert', 'followup', 'followup'])
    system = None
    r = rng.random()
    if kind in NUMBER_TASKS or kind == 'followup':
        # A third of the number tasks change format through the system prompt, a sixth get a
        # neutral system prompt that must not change anything.
        if r < 0.17:
            system = SYS_WORDS
        elif r < 0.33:
            system = SYS_JSON
        elif r < 0.5:
            system = rng.choice(SYS_PLAIN)
    elif r < 0.2:
        system = rng.choice(SYS_PLAIN)
    messages = [{'role': 'system', 'content': system}] if system else []
    if kind == 'followup':
        q, v = rng.choice([task_add, task_sub])(rng)
        follow, fn = rng.choice(FOLLOW_UPS)
        v2 = fn(v)
        if v2 < 0:
            follow, v2 = FOLLOW_UPS[1][0], v + 1
        messages += [{'role': 'user', 'content': q},
                     {'role': 'assistant', 'content': number_reply(v, system)},
                     {'role': 'user', 'content': follow}]
        reply = number_reply(v2, system)
    elif kind in NUMBER_TASKS:
        q, v = NUMBER_TASKS[kind](rng)
        messages.append({'role': 'user', 'content': q})
        reply = number_reply(v, system)
    else:
        q, reply = TEXT_TASKS[kind](rng)
        messages.append({'role': 'user', 'content': q})
    messages.append({'role': 'assistant', 'content': reply})
    return {'messages': messages, 'task': kind, 'reference': reply}


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """n examples; `exclude` holds prompt keys to keep out (makes the test set truly held out)."""
    rng = random.Random(seed)
    out, seen = [], set(exclude or ())
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise SystemExit(f'make_demo_data: could not find {n} distinct conversations '
                             f'(got {len(out)}); ask for fewer')
        ex = make_example(rng)
        key = prompt_key(ex)
        if key in seen:
            continue
        seen.add(key)
        out.append(ex)
    return out


def prompt_key(ex: dict) -> str:
    return json.dumps(ex['messages'][:-1], sort_keys=True)


SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')


def build_tokenizer(records: list[dict], vocab_size: int):
    """Byte-level BPE learned from the conversations' text, deterministically (merges picked by
    count, ties by the pair itself). Byte-level: any text the user types still encodes."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tokenizer import QWEN_PATTERN
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    words: dict[tuple[str, ...], int] = {}
    # role headers are encoded on their own (tokenizer.encode_conversation), so learn them too
    texts = [t for r in records for m in r['messages'] for t in (m['role'] + '\n', m['content'])]
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            w = tuple(piece)
            words[w] = words.get(w, 0) + 1
    alphabet = sorted(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    n_merges = vocab_size - len(alphabet) - len(SPECIALS)
    if n_merges < 0:
        raise SystemExit(f'make_demo_data: --vocab_size must be >= {len(alphabet) + len(SPECIALS)}')
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], [-ord(ch) for ch in kv[0][0] + '\0' + kv[0][1]]))
        if count < 2:
            break
        merges.append((a, b))
        vocab[a + b] = len(vocab)
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<|im_end|>',
                                  pad_token='<|endoftext|>', unk_token=None)


def write_tokenizer(path: str, records: list[dict], vocab_size: int) -> int:
    import shutil
    import tempfile
    tok = build_tokenizer(records, vocab_size)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix='.tokenizer.tmp', dir=parent)
    try:
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(tok)


def write_jsonl(path: str, records: list[dict]) -> None:
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + '\n')
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out_dir', default='data/demo')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--n_train', type=int, default=4000)
    p.add_argument('--n_test', type=int, default=300)
    p.add_argument('--vocab_size', type=int, default=384,
                   help='max tokens of the small demo tokenizer written to OUT_DIR/tokenizer')
    p.add_argument('--no_tokenizer', action='store_true', help='write the conversations only')
    args = p.parse_args(argv)
    if args.n_train < 0 or args.n_test < 0:
        raise SystemExit('make_demo_data: --n_train and --n_test must be >= 0')
    # Test first with its own seed, then train excluding the test prompts: no held-out prompt is
    # ever seen in training, and the test set does not change when --n_train does.
    test = generate(args.n_test, args.seed + 1)
    train = generate(args.n_train, args.seed, exclude={prompt_key(e) for e in test})
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, 'train.jsonl'), train)
    write_jsonl(os.path.join(args.out_dir, 'test.jsonl'), test)
    if not args.no_tokenizer:
        n = write_tokenizer(os.path.join(args.out_dir, 'tokenizer'), train, args.vocab_size)
        print(f'wrote {args.out_dir}/tokenizer ({n} tokens; use it with prepare_sft.py '
              f'--tokenizer {args.out_dir}/tokenizer)', file=sys.stderr)
    counts = {}
    for ex in train:
        counts[ex['task']] = counts.get(ex['task'], 0) + 1
    print(f'wrote {len(train)} train and {len(test)} held-out conversations to {args.out_dir}/ '
          f'(tasks: {", ".join(f"{k} {v}" for k, v in sorted(counts.items()))})', file=sys.stderr)


if __name__ == '__main__':
    main()
