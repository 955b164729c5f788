"""prepare_sft's encoding vs the transformers/TRL path vs raw tiktoken, on GSM8K train, one core.

    .venv/bin/python benchmarks/bench_prepare.py [--data ../shared/data/gsm8k/train.jsonl] [--cores 1]
    .venv/bin/python benchmarks/bench_prepare.py --formats [--repeats 3]   # the chat formats

--formats: encoding speed of every chat format per token, against the Qwen3 path (see
bench_formats below).

1. nanoSFT: tokenizer.encode_conversation (ids + labels) for every example.
2. transformers: what a TRL user runs per example: a PreTrainedTokenizerFast built from the same
   ranks (TikTokenConverter + NFC + the Qwen3 added tokens) and
   apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True) with a ChatML
   template marked with {% generation %}. Its ids and masks are checked against ours.
3. raw tiktoken: encode_ordinary_batch(num_threads=1), and a plain encode_ordinary loop, of the same text (the rendered conversation
   without its control tokens): the floor for any encoder built on these ranks.
Also times the whole prepare_sft CLI (read, encode, split, write shards) on the same file.
Times are the best CPU time (time.process_time) of --repeats runs (transformers: half as many).
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chat_records  # noqa: E402
import prepare_sft  # noqa: E402
from chat_format import encode_conversation  # noqa: E402
from tokenizer import load_tokenizer, to_hf_tokenizer  # noqa: E402

CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def best_of(fn, repeats):
    # CPU time of this (single-core) process: other jobs on a shared machine do not inflate it
    best, out = float('inf'), None
    for _ in range(repeats):
        t = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t)
    return best, out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default=os.path.join(here, '..', '..', 'shared', 'data', 'gsm8k', 'train.jsonl'))
    p.add_argument('--cores', type=int, default=1, help='pin the process to this many cores')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--formats', action='store_true', help='benchmark the chat formats (bench_formats)')
    p.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument('--dirs', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    if args.worker is not None:
        return format_worker(args)
    if args.formats:
        return bench_formats(args)

    records = chat_records.load_records(args.data, fmt='gsm8k')
    n = len(records)
    tok = load_tokenizer('qwen3')
    print(f'{n} examples from {args.data}, {args.cores} core(s)')

    def ours():
        return [encode_conversation(m, tok) for m in records]
    t_ours, encoded = best_of(ours, args.repeats)
    n_tok = sum(len(i) for i, _ in encoded)

    texts = [''.join(m['role'] + '\n' + m['content'] + '\n' for m in msgs) for msgs in records]
    t_batch, raw = best_of(lambda: tok.enc.encode_ordinary_batch(texts, num_threads=1), args.repeats)
    n_raw = sum(len(r) for r in raw)
    # a plain loop avoids the batch API's thread pool; the faster of the two is the floor
    t_loop, _ = best_of(lambda: [tok.enc.encode_ordinary(t) for t in texts], args.repeats)
    t_raw = min(t_batch, t_loop)

    hf = to_hf_tokenizer(tok, chat_template=CHATML_GENERATION)

    def transformers_path():
        return [hf.apply_chat_template(m, tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True) for m in records]
    t_hf, hf_out = best_of(transformers_path, max(1, args.repeats // 2))
    same_ids = same_masks = 0
    for (ids, labels), o in zip(encoded, hf_out):
        if list(o['input_ids']) == ids:
            same_ids += 1
            same_masks += [int(l != -100) for l in labels] == list(o['assistant_masks'])

    with tempfile.TemporaryDirectory() as d:
        t = time.process_time()
        prepare_sft.main(['--input', args.data, '--out_dir', d, '--format', 'gsm8k'])
        t_cli = time.process_time() - t

    rows = [('nanoSFT encode_conversation', t_ours, n_tok), ('transformers apply_chat_template', t_hf, n_tok),
            ('raw tiktoken encode_ordinary_batch', t_batch, n_raw),
            ('raw tiktoken encode_ordinary loop', t_loop, n_raw), ('prepare_sft CLI end to end', t_cli, n_tok)]
    print(f'\n{"path":<38}{"CPU s":>9}{"examples/s":>13}{"tokens/s":>13}')
    for name, t, ntok in rows:
        print(f'{name:<38}{t:>9.3f}{n / t:>13,.0f}{ntok / t:>13,.0f}')
    print(f'\nidentical ids (transformers vs nanoSFT): {same_ids}/{n}; identical masks: {same_masks}/{n}')
    print(f'speed-up vs transformers: {t_hf / t_ours:.1f}x (goal >= 5x)')
    print(f'slow-down vs raw tiktoken (faster of batch/loop): {t_ours / t_raw:.2f}x (goal <= 2x)')



# ----------------------------------------------------------------------------------------------
# --formats: each chat format's encoding speed per token vs the Qwen3 path

FORMAT_CONTENDERS = [   # (label, tokenizer: 'qwen3' or a directory built below, format, encoder, ids group)
    # encoder 'auto': what load_tokenizer picks; 'tokenizers': the library encoder, forced. Each
    # group's contenders must give identical ids and labels.
    ('qwen3 tokenizer, chatml (baseline)', 'qwen3', 'chatml', 'auto', None),
    ('qwen2.5 dir (complete merges), qwen2.5', 'qwen2.5', 'qwen2.5', 'auto', 'qwen2.5'),
    ('qwen2.5 dir as shipped, qwen2.5', 'qwen2.5-shipped', 'qwen2.5', 'auto', 'qwen2.5'),
    ('qwen2.5 dir as shipped, tokenizers forced', 'qwen2.5-shipped', 'qwen2.5', 'tokenizers', 'qwen2.5'),
    ('llama3 dir, llama3', 'llama3', 'llama3', 'auto', 'llama3'),
    ('llama3 dir, llama3, tokenizers forced', 'llama3', 'llama3', 'tokenizers', 'llama3'),
    ('byte-level dir, mistral', 'mistral-bytes', 'mistral', 'auto', 'mistral-bytes'),
    ('byte-level dir, mistral, tokenizers forced', 'mistral-bytes', 'mistral', 'tokenizers', 'mistral-bytes'),
    ('SentencePiece-style dir, mistral', 'mistral-sp', 'mistral', 'auto', 'mistral-sp'),
    ('SentencePiece-style dir, tokenizers forced', 'mistral-sp', 'mistral', 'tokenizers', 'mistral-sp'),
    ('SP-style dir fit to this text, mistral', 'mistral-sp-own', 'mistral', 'auto', 'mistral-sp-own'),
    ('SP-style dir fit to this text, forced', 'mistral-sp-own', 'mistral', 'tokenizers', 'mistral-sp-own'),
    ('llama3 dir, general path (hf)', 'llama3', 'hf', 'auto', 'llama3'),
]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
                   '<|reserved_special_token_1|>', '<|finetune_right_pad_id|>', '<|step_id|>',
                   '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>', '<|python_tag|>']
MISTRAL_SPECIALS = ['<unk>', '<s>', '</s>', '[INST]', '[/INST]', '[TOOL_CALLS]', '[AVAILABLE_TOOLS]',
                    '[/AVAILABLE_TOOLS]', '[TOOL_RESULTS]', '[/TOOL_RESULTS]']


def _write_dir(path, spec, added, config, eos):
    """A tokenizer directory: tokenizer.json = spec with `added` [(content, special)] appended."""
    from tokenizers import AddedToken, Tokenizer
    tok = Tokenizer.from_str(json.dumps(spec))
    for content, special in added:
        t = AddedToken(content, special=special, normalized=False)
        tok.add_special_tokens([t]) if special else tok.add_tokens([t])
    os.makedirs(path)
    tok.save(os.path.join(path, 'tokenizer.json'))
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f)
    with open(os.path.join(path, 'generation_config.json'), 'w') as f:
        json.dump({'eos_token_id': [tok.token_to_id(t) for t in eos]}, f)


def as_shipped(spec):
    """A converted byte-level tokenizer.json in the shape Qwen2/2.5 ship: one merge per token, its
    natural split (what tiktoken's merging of the token's own bytes ends with), in rank order,
    and ignore_merges false."""
    from tokenizer import _natural_splits
    vocab = spec['model']['vocab']
    splits = _natural_splits(vocab)
    merges = [list(splits[t]) for t in sorted(splits, key=vocab.get)]
    return dict(spec, model=dict(spec['model'], merges=merges, ignore_merges=False))


def _sentencepiece_style(texts, split_digits: bool) -> dict:
    """A 32k SentencePiece-style BPE (Metaspace, byte fallback) trained on texts: the shape of
    Mistral's tokenizer.json. split_digits: numbers one digit per token, as Mistral's and Llama 2's
    SentencePiece models are trained (split_digits=True), so the vocabulary has no multi-digit token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    sp = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True))
    meta = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first', split=True)
    sp.pre_tokenizer = pre_tokenizers.Sequence([meta, pre_tokenizers.Digits(individual_digits=True)]) \
        if split_digits else meta
    sp.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f'<0x{b:02X}>' for b in range(256)]
    sp.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32768, show_progress=False,
                                                      special_tokens=MISTRAL_SPECIALS + byte_tokens))
    spec = json.loads(sp.to_str())   # byte pieces are vocabulary entries, not added tokens
    spec['added_tokens'] = [t for t in spec['added_tokens'] if t['content'] not in byte_tokens]
    # as in Llama-2-style tokenizer.json files: one Metaspace, no split (digits stay apart because
    # no merge joins them)
    if split_digits:
        spec['pre_tokenizer'] = spec['pre_tokenizer']['pretokenizers'][0]
    spec['pre_tokenizer']['split'] = False
    return spec


def build_format_dirs(root, texts, held_out):
    """Realistic-size tokenizer directories: the 151k Qwen ranks converted to tokenizer.json (the
    complete merge list TikTokenConverter writes, like Llama 3's) with each family's pre-tokenizer
    and special tokens; the same ranks with one merge per token (as_shipped: Qwen2.5's own
    tokenizer.json); a 32k SentencePiece-style BPE trained, as a real one is, on other text
    (held_out: GSM8K test) with digits split (mistral-sp); and one fit to the benchmark's own text
    with numbers merged (mistral-sp-own), which needs far fewer tokens for it than any real one."""
    from tokenizer import QWEN3_SPECIALS
    templates = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'chat_templates')

    def template(name):
        with open(os.path.join(templates, f'{name}.jinja')) as f:
            return f.read()
    base = json.loads(to_hf_tokenizer(load_tokenizer('qwen3')).backend_tokenizer.to_str())
    base['added_tokens'] = []
    qwen = [(t, t not in ('<tool_call>', '</tool_call>')) for t in QWEN3_SPECIALS[:22]]
    qwen_config = {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>', 'chat_template': template('qwen2.5')}
    _write_dir(os.path.join(root, 'qwen2.5'), base, qwen, qwen_config, ['<|im_end|>', '<|endoftext|>'])
    _write_dir(os.path.join(root, 'qwen2.5-shipped'), as_shipped(base), qwen, qwen_config,
               ['<|im_end|>', '<|endoftext|>'])
    llama = dict(base, normalizer=None, pre_tokenizer={'type': 'Sequence', 'pretokenizers': [
        {'type': 'Split', 'pattern': {'Regex': LLAMA3_PATTERN}, 'behavior': 'Isolated', 'invert': False},
        {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}]})
    _write_dir(os.path.join(root, 'llama3'), llama, [(t, True) for t in LLAMA3_SPECIALS],
               {'bos_token': '<|begin_of_text|>', 'eos_token': '<|eot_id|>', 'chat_template': template('llama3')},
               ['<|end_of_text|>', '<|eom_id|>', '<|eot_id|>'])
    mistral_config = {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
                      'chat_template': template('mistral')}
    _write_dir(os.path.join(root, 'mistral-bytes'), base, [(t, True) for t in MISTRAL_SPECIALS],
               mistral_config, ['</s>'])
    _write_dir(os.path.join(root, 'mistral-sp'), _sentencepiece_style(held_out, True), [], mistral_config, ['</s>'])
    _write_dir(os.path.join(root, 'mistral-sp-own'), _sentencepiece_style(texts, False), [], mistral_config,
               ['</s>'])


def encoder_name(tok) -> str:
    # a Metaspace tokenizer runs on tiktoken or on its word cache (tokenizer._metaspace_ranks)
    name = type(tok).__name__
    return name + ('+tiktoken' if getattr(tok, 'enc', None) is not None and 'Metaspace' in name else '')


def format_worker(args):
    """One contender in its own process: load, then encode every example; prints a JSON line."""
    import hashlib
    import tokenizer as tokenizer_module
    from chat_format import get_format
    label, tok_name, fmt_name, encoder, _group = FORMAT_CONTENDERS[args.worker]
    records = chat_records.load_records(args.data, fmt='gsm8k')
    t0 = time.process_time()
    if tok_name == 'qwen3':
        tok = load_tokenizer('qwen3')
    else:   # encoder 'tokenizers': the library encoder even where a faster exact one exists
        tok = tokenizer_module._load_directory(os.path.join(args.dirs, tok_name), encoder=encoder)
    fmt = get_format(fmt_name, tok)
    t_load = time.process_time() - t0
    t0 = time.process_time()
    out = [fmt.encode(m) for m in records]
    t_encode = time.process_time() - t0
    h = hashlib.sha256()
    for ids, labels in out:
        h.update(json.dumps([ids, labels]).encode())
    with open('/proc/self/status') as f:   # ru_maxrss would carry the parent's peak across exec
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    print(json.dumps({'cpu_s': t_encode, 'load_s': t_load, 'tokens': sum(len(i) for i, _ in out),
                      'encoder': encoder_name(tok), 'rss_mb': peak_kb / 1024, 'digest': h.hexdigest()[:16]}))


def bench_formats(args):
    """Each contender in its own process, interleaved, --repeats rounds; medians of the encoding
    CPU seconds (time.process_time: user + sys of that process) per token and peak RSS."""
    import statistics
    import subprocess
    records = chat_records.load_records(args.data, fmt='gsm8k')
    texts = [m['content'] for msgs in records for m in msgs]
    test = os.path.join(os.path.dirname(args.data), 'test.jsonl')   # GSM8K's other split
    if not os.path.exists(test):
        raise SystemExit(f'--formats: {test} not found: the SentencePiece-style tokenizer is trained on '
                         f'text other than the benchmark\'s, GSM8K test beside --data')
    held_out = [m['content'] for msgs in chat_records.load_records(test, fmt='gsm8k') for m in msgs]
    with tempfile.TemporaryDirectory() as dirs:
        t0 = time.time()
        build_format_dirs(dirs, texts, held_out)
        with open(os.path.join(dirs, 'qwen2.5-shipped', 'tokenizer.json'), encoding='utf-8') as f:
            shipped = json.load(f)['model']
        print(f'{len(records)} examples from {args.data}; tokenizer dirs built in {time.time() - t0:.0f} s '
              f'(qwen2.5 as shipped: {len(shipped["merges"]):,} merges for {len(shipped["vocab"]):,} '
              f'tokens); {args.repeats} interleaved rounds, {args.cores} core(s)')
        runs = {i: [] for i in range(len(FORMAT_CONTENDERS))}
        for r in range(args.repeats):
            for i in runs:
                cmd = [sys.executable, os.path.abspath(__file__), '--worker', str(i), '--dirs', dirs,
                       '--data', args.data, '--cores', str(args.cores)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[i].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {i: {k: statistics.median(x[k] for x in rs) for k in ('cpu_s', 'load_s', 'rss_mb')}
           for i, rs in runs.items()}
    base = med[0]['cpu_s'] / runs[0][0]['tokens']
    print(f'\n{"contender":<42}{"encoder":>32}{"tokens":>10}{"CPU s":>8}{"ns/token":>10}{"vs qwen3":>10}'
          f'{"load s":>8}{"RSS MB":>8}')
    for i, (label, *_rest) in enumerate(FORMAT_CONTENDERS):
        r, m = runs[i][0], med[i]
        per = m['cpu_s'] / r['tokens']
        print(f'{label:<42}{r["encoder"]:>32}{r["tokens"]:>10,}{m["cpu_s"]:>8.2f}{1e9 * per:>10.0f}'
              f'{per / base:>9.2f}x{m["load_s"]:>8.2f}{m["rss_mb"]:>8.0f}')
    groups = {}
    for i, (*_rest, group) in enumerate(FORMAT_CONTENDERS):
        if group is not None:
            groups.setdefault(group, []).append(i)
    print()
    for group, members in groups.items():
        same = len({runs[i][0]['digest'] for i in members}) == 1
        print(f'{group}: ids+labels identical in {" / ".join(FORMAT_CONTENDERS[i][0] for i in members)}: {same}')
    print(f'every run of a contender identical: '
          f'{all(len({x["digest"] for x in rs}) == 1 for rs in runs.values())}')
    print('goal: built-in renderers within 1.5x of the Qwen3 path per token')


if __name__ == '__main__':
    main()
