"""
The data side of train_sft.py: the shard format prepare_sft.py writes (ShardWriter) and training
reads (ShardDataset, memory-mapped), a .jsonl split tokenized in memory (JsonlSplit), the weighted
mixture of sources (Mixture), examples turned into training rows (padding, or best-fit packing with
document ids), and the world-size-invariant global sampler whose cursor (epoch, position) is all
that resume needs.

A data dir holds, per split ('train', 'val'):
  {split}.bin    tokens, uint32 (uint16 when the vocabulary fits), all examples back to back
  {split}.mask   uint8, 1 = trained token (assistant content and its end-of-turn token)
  {split}.idx    int64 offsets, n+1 entries: example i is [idx[i], idx[i+1])
  {split}.src    uint16, the source (index into meta.json's 'sources') of each example; optional
                 (data dirs written before it have one source)
and meta.json (format_version, token_dtype, tokenizer, settings, sources and their weights,
mixture_by, counts, audit stats, and the sha256 of every shard file, checked before training: a
flipped byte would otherwise train silently on a wrong token or mask).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os

import numpy as np
import torch

from chat_format import resolve_format
from chat_records import DataError, iter_records
from tokenizer import load_tokenizer

IGNORE_INDEX = -100
DEFAULT_PAD_ID = 151643      # <|endoftext|>
SHARD_FORMAT_VERSION = 1
SPLITS = ('train', 'val')
SOURCE_DTYPE = np.uint16     # the .src files: up to 65,535 sources
MIXTURE_BY = ('examples', 'tokens')


# ----------------------------------------------------------------------------------------------
# The shard format: writing and reading

class ShardWriter:
    """Writes a data dir's shard files under temporary names, example by example (nothing is
    held in memory but the open files); commit(meta) renames them into place, meta.json last, so a
    directory with a meta.json always has complete shards beside it, and a failed or killed run
    leaves no half-written shard (use it as a context manager)."""

    def __init__(self, out_dir: str, token_dtype):
        self.out_dir, self.dtype = out_dir, np.dtype(token_dtype)
        self.created = not os.path.isdir(out_dir)   # a failed run removes the dir it made
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:   # an existing file, or a path under one
            raise DataError(f'--out_dir {out_dir}: cannot create the directory ({e.strerror or e})') from None
        _remove_stale_tmp(out_dir)
        suffix = f'.tmp-{os.getpid()}'
        names = [f'{s}.{e}' for s in SPLITS for e in ('bin', 'mask', 'idx', 'src')] + ['meta.json']
        self.final = {n: os.path.join(out_dir, n) for n in names}
        self.tmp = {n: p + suffix for n, p in self.final.items()}
        self.files, self.hashes = {}, {}
        self.n_tokens = {s: 0 for s in SPLITS}
        for s in SPLITS:
            for e in ('bin', 'mask', 'idx', 'src'):
                self.files[f'{s}.{e}'] = open(self.tmp[f'{s}.{e}'], 'wb')
                self.hashes[f'{s}.{e}'] = hashlib.sha256()
            self._write(f'{s}.idx', np.int64(0).tobytes())

    def _write(self, name: str, data: bytes) -> None:
        self.files[name].write(data)
        self.hashes[name].update(data)   # as written: no second read of the shards

    def add(self, split: str, ids: np.ndarray, mask: np.ndarray, source: int = 0) -> None:
        self._write(f'{split}.bin', np.asarray(ids).astype(self.dtype).tobytes())
        self._write(f'{split}.mask', np.asarray(mask, dtype=np.uint8).tobytes())
        self.n_tokens[split] += len(ids)
        self._write(f'{split}.idx', np.int64(self.n_tokens[split]).tobytes())
        self._write(f'{split}.src', SOURCE_DTYPE(source).tobytes())

    def commit(self, meta: dict) -> dict:
        """Finish every file, write meta.json (+ format_version, token_dtype), rename all into place."""
        for f in self.files.values():
            f.close()
        meta = {'format_version': SHARD_FORMAT_VERSION, 'token_dtype': self.dtype.name, **meta,
                'sha256': {name: h.hexdigest() for name, h in sorted(self.hashes.items())}}
        with open(self.tmp['meta.json'], 'w') as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        for name in sorted(self.final, key=lambda n: n == 'meta.json'):
            os.replace(self.tmp[name], self.final[name])
        return meta

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        for p in self.tmp.values():
            if os.path.exists(p):
                os.remove(p)
        if self.created and not os.listdir(self.out_dir):
            os.rmdir(self.out_dir)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


def _remove_stale_tmp(out_dir: str):
    # leftovers of a killed run (never read: the reader only opens the final names)
    for name in os.listdir(out_dir):
        base, _, pid = name.rpartition('.tmp-')
        if base and pid.isdigit() and base.split('.')[0] in ('train', 'val', 'meta'):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass


class ShardDataset:
    """Memory-mapped reader of one split of a data dir (see the module docstring).

    ds = ShardDataset('data/my_sft', 'train'); input_ids, labels = ds[i]   (int64 numpy arrays,
    labels = -100 where not trained); ds.lengths = token length of every example; ds.meta = meta.json.
    verify=True checks the split's files against meta.json's sha256 digests first (verify_shards).
    """

    def __init__(self, data_dir: str, split: str = 'train', verify: bool = False):
        meta_path = os.path.join(data_dir, 'meta.json')
        if not os.path.exists(meta_path):
            raise DataError(f'{meta_path}: not found (run prepare_sft.py to create it)')
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f'{meta_path}: unreadable ({e})') from None
        if self.meta.get('format_version') != SHARD_FORMAT_VERSION:
            raise DataError(f'{meta_path}: format_version {self.meta.get("format_version")!r}, this '
                             f'reader understands {SHARD_FORMAT_VERSION}; re-run prepare_sft.py')
        if split not in SPLITS:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        dtype = np.dtype(self.meta.get('token_dtype', 'uint32'))
        paths = {ext: os.path.join(data_dir, f'{split}.{ext}') for ext in ('bin', 'mask', 'idx')}
        for p in paths.values():
            if not os.path.exists(p):
                raise DataError(f'{p}: missing shard file (listed by {meta_path})')
        src = os.path.join(data_dir, f'{split}.src')
        if verify:
            verify_shards(data_dir, self.meta, [f'{split}.{ext}' for ext in ('bin', 'mask', 'idx')] +
                          ([f'{split}.src'] if os.path.exists(src) else []))
        self.idx = self._map(paths['idx'], np.int64)
        n_tok = int(self.idx[-1]) if len(self.idx) else -1
        if len(self.idx) == 0 or self.idx[0] != 0 or np.any(np.diff(self.idx) < 0):
            raise DataError(f'{paths["idx"]}: corrupt offsets index (must start at 0 and not decrease)')
        expected_n = self.meta.get('splits', {}).get(split, {}).get('examples')
        if expected_n is not None and expected_n != len(self.idx) - 1:
            raise DataError(f'{paths["idx"]}: {len(self.idx) - 1} examples but meta.json says {expected_n}')
        for ext, dt in (('bin', dtype), ('mask', np.uint8)):
            size = os.path.getsize(paths[ext])
            if size != n_tok * np.dtype(dt).itemsize:
                raise DataError(f'{paths[ext]}: {size} bytes, but {paths["idx"]} says {n_tok} tokens '
                                 f'of {np.dtype(dt).name} (truncated or mismatched shard)')
        self.tokens = self._map(paths['bin'], dtype)
        self.mask = self._map(paths['mask'], np.uint8)
        self.lengths = np.diff(self.idx)
        self.split = split
        self.sources = None   # the source of each example (None: one source)
        if os.path.exists(src):
            size, want = os.path.getsize(src), len(self) * np.dtype(SOURCE_DTYPE).itemsize
            if size != want:
                raise DataError(f'{src}: {size} bytes, but {paths["idx"]} says {len(self)} examples '
                                f'({want} bytes of {np.dtype(SOURCE_DTYPE).name})')
            self.sources = self._map(src, SOURCE_DTYPE)

    def trained_counts(self, chunk_tokens: int = 1 << 24) -> np.ndarray:
        """Trained tokens of every example (one pass over the mask, a chunk at a time)."""
        out = np.zeros(len(self), dtype=np.int64)
        i = 0
        while i < len(self):
            j = max(i + 1, int(np.searchsorted(self.idx, self.idx[i] + chunk_tokens, 'right')) - 1)
            j = min(j, len(self))
            a = int(self.idx[i])
            cs = np.concatenate([[0], np.cumsum(self.mask[a:int(self.idx[j])], dtype=np.int64)])
            out[i:j] = cs[self.idx[i + 1:j + 1] - a] - cs[self.idx[i:j] - a]
            i = j
        return out

    @staticmethod
    def _map(path, dtype):
        # np.memmap refuses empty files; an empty split is legitimate
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode='r')

    def __len__(self) -> int:
        return len(self.idx) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f'example {i} out of range for {self.split} ({n} examples)')
        a, b = int(self.idx[i]), int(self.idx[i + 1])
        ids = self.tokens[a:b].astype(np.int64)
        labels = np.where(self.mask[a:b] != 0, ids, -100)
        return ids, labels


# ----------------------------------------------------------------------------------------------


def verify_shards(data_dir: str, meta: dict, names) -> bool:
    """Compare each file's sha256 with the digest prepare_sft.py recorded in meta.json (about 1 s per
    GB on a 2-core VM). -> False when meta.json has no digests (a data dir from before them)."""
    digests = meta.get('sha256')
    if not digests:
        return False
    for name in names:
        path, h = os.path.join(data_dir, name), hashlib.sha256()
        with open(path, 'rb') as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        if h.hexdigest() != digests.get(name):
            raise DataError(f'{path}: damaged shard: its sha256 differs from the one meta.json recorded '
                            f'when prepare_sft.py wrote it; prepare the data again (verify_data=False '
                            f'skips this check)')
    return True


# ----------------------------------------------------------------------------------------------
# Splits and batching

class JsonlSplit:
    """A .jsonl chat file tokenized once in memory; same (input_ids, labels) as the binary shards."""

    def __init__(self, path, split, tokenizer_name='qwen3', train_on='all', chat_template='auto'):
        try:
            tok = load_tokenizer(tokenizer_name)
            fmt = resolve_format(tok, chat_template)
        except ValueError as e:
            raise DataError(f'data_dir {path}: {e}') from None
        records = list(iter_records(path))
        # Deterministic split without a val file: every 20th conversation is validation.
        # Fewer than 20: all train, no val (not the same records in both: a val loss that is the
        # training loss).
        keep = (lambda i: i % 20 == 19) if split == 'val' else (lambda i: i % 20 != 19)
        records = [r for i, r in enumerate(records) if keep(i)]
        self.examples = []
        for where, messages in records:
            try:
                ids, labels = fmt.encode(messages, train_on)
            except ValueError as e:   # e.g. the general chat-template path refusing a conversation
                raise DataError(f'{where}: {e}') from None
            self.examples.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
        self.lengths = np.array([len(e[0]) for e in self.examples], dtype=np.int64)
        self.meta = {'tokenizer': dict(tok.meta(), chat_format=fmt.meta()), 'chat_template': fmt.name,
                     'train_on': train_on}

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def open_split(path, split, tokenizer='qwen3', train_on='all', chat_template='auto', verify=True):
    """A prepare_sft.py data dir (ShardDataset, its files checked against their digests when verify),
    or a .jsonl file tokenized now (JsonlSplit: tokenizer, train_on and chat_template apply to it)."""
    if str(path).endswith('.jsonl'):
        if not os.path.isfile(path):
            raise DataError(f"data_dir: file not found: {path}")
        return JsonlSplit(path, split, tokenizer, train_on, chat_template)
    if not os.path.isdir(path):
        raise DataError(f"data_dir: directory not found: {path} (build it with prepare_sft.py "
                         f"--out_dir {path}, or point data_dir at a .jsonl file)")
    try:
        return ShardDataset(path, split, verify=verify)
    except OSError as e:
        raise DataError(f"data_dir {path}: cannot read the {split} split: {e}") from e


# ----------------------------------------------------------------------------------------------
# Weighted mixtures of sources

class Mixture:
    """
    Weighted sampling of a split's sources (prepare_sft.py --input a.jsonl:0.7 b.parquet:0.3).

    An epoch is as large as the split: its examples (by='examples') or its trained tokens
    (by='tokens'), and source s gets the share weights[s] of it, b_s = weight_s * epoch size. Each
    source is an endless stream of its examples: seeded permutations one after another (cycle c is
    default_rng([seed, 1, s, c]).permutation), so an upsampled source repeats in a new order each
    time through, and a downsampled one reaches all its examples over several epochs. Epoch e takes
    from source s the stretch of its stream whose cumulative size (1 per example, or trained tokens)
    ends in (e * b_s, (e + 1) * b_s]; the sources' picks are then shuffled together
    (default_rng([seed, 2, e])). Epoch e is a pure function of (seed, e): nothing carries over from
    epoch to epoch, so the sampler's cursor stays all that resume needs, and the realized share of a
    source in any epoch is its weight to within one example.
    """

    def __init__(self, sources, weights, by: str = 'examples', trained=None, seed: int = 1337,
                 names=None):
        if by not in MIXTURE_BY:
            raise DataError(f'mixture_by={by!r}: expected one of {MIXTURE_BY}')
        sources = np.asarray(sources)
        self.names = list(names) if names is not None else [f'source {k}' for k in range(len(weights))]
        self.by, self.seed = by, seed
        self.weights = np.asarray(weights, dtype=np.float64)
        if not len(self.weights) or not np.all(np.isfinite(self.weights)) or np.any(self.weights <= 0):
            raise DataError(f'mixture weights must be positive numbers, got {list(weights)}')
        self.members = [np.flatnonzero(sources == k) for k in range(len(self.weights))]
        self.trained = np.asarray(trained, dtype=np.int64) if trained is not None else None
        self.sizes = (np.ones(len(sources)) if by == 'examples' else
                      np.asarray(trained, dtype=np.float64))
        self.totals = np.array([self.sizes[m].sum() for m in self.members])
        for k, total in enumerate(self.totals):
            if total <= 0:
                raise DataError(f'mixture: source {self.names[k]!r} has weight {weights[k]} but no '
                                f'{"examples" if by == "examples" else "trained tokens"} in this split')
        self.budget = self.weights / self.weights.sum() * self.totals.sum()

    def picks(self, k: int, epoch: int) -> np.ndarray:
        """Source k's examples in epoch `epoch`, in stream order."""
        lo, hi, total = epoch * self.budget[k], (epoch + 1) * self.budget[k], self.totals[k]
        out = []
        for cycle in range(int(lo // total), int(hi // total) + 1):
            perm = np.random.default_rng([self.seed, 1, k, cycle]).permutation(self.members[k])
            ends = cycle * total + np.cumsum(self.sizes[perm])
            out.append(perm[(ends > lo) & (ends <= hi)])
        return np.concatenate(out)

    def order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch` of the mixture: every source's picks, shuffled together."""
        picks = np.concatenate([self.picks(k, epoch) for k in range(len(self.weights))])
        return np.random.default_rng([self.seed, 2, epoch]).permutation(picks)

    def report(self, epoch: int = 0) -> list[dict]:
        """Per source: weight, examples and trained tokens in the split, and what epoch `epoch`
        realizes: examples, trained tokens and their shares, how often the source is gone through."""
        picks = [self.picks(k, epoch) for k in range(len(self.weights))]
        n_all = max(sum(len(p) for p in picks), 1)
        t_all = max(sum(int(self.trained[p].sum()) for p in picks), 1) if self.trained is not None else 1
        rows = []
        for k, p in enumerate(picks):
            t = int(self.trained[p].sum()) if self.trained is not None else None
            rows.append({'name': self.names[k], 'weight': float(self.weights[k] / self.weights.sum()),
                         'examples': len(self.members[k]), 'epoch_examples': len(p),
                         'example_share': len(p) / n_all,
                         'epoch_trained_tokens': t, 'token_share': None if t is None else t / t_all,
                         'passes': float(self.budget[k] / self.totals[k])})
        return rows


def mixture_of(split, by: str = '', seed: int = 1337) -> Mixture | None:
    """The Mixture a data dir's meta.json asks for (sources with weights), or None (one source, or
    sources without weights: every example once per epoch). by='' keeps the data dir's mixture_by."""
    meta = getattr(split, 'meta', None) or {}
    sources = meta.get('sources') or []
    if not sources or any(s.get('weight') is None for s in sources):
        return None
    if getattr(split, 'sources', None) is None:
        raise DataError('meta.json has weighted sources but the split has no .src file (damaged data dir)')
    by = by or meta.get('mixture_by') or 'examples'
    trained = split.trained_counts()
    return Mixture(split.sources, [s['weight'] for s in sources], by, trained, seed,
                   [s.get('name', f'source {k}') for k, s in enumerate(sources)])


def pack_best_fit(order, lengths, block_size) -> list[list[int]]:
    """
    Best-fit packing of examples, taken in the given (shuffled) order, into rows of block_size tokens:
    each example goes into the open row with the least room that still fits it. On GSM8K at
    block_size 1024 this wastes ~3% of the tokens to padding, where next-fit wastes ~10%.
    Deterministic given the order, so every rank builds the same rows.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []      # sorted (room left, row index) of rows that are not full
    for i in order:
        n = min(int(lengths[i]), block_size)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = block_size, len(rows)
            rows.append([])
        rows[r].append(int(i))
        if room > n:
            bisect.insort(free, (room - n, r))
    return rows


class Singletons:
    """The padding-mode order as units [[i], [j], ...] without a python list per example."""

    def __init__(self, order: np.ndarray):
        self.order = order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [[int(j)] for j in self.order[i]]
        return [int(self.order[i])]

    def __iter__(self):
        return ([int(j)] for j in self.order)

    def __eq__(self, other):
        return list(self) == list(other)


class SFTDataset:
    """
    Examples of one split turned into training rows. A unit is what fills one row of a micro-batch:
    one example (padding) or a packed list of examples (packing). `units(epoch)` is a seeded
    permutation of the split, or with a Mixture its weighted epoch (packed after shuffling): the
    global order the sampler walks through.
    """

    def __init__(self, data, block_size, packing=False, pad_id=DEFAULT_PAD_ID, seed=1337, shuffle=True,
                 mixture: Mixture | None = None):
        self.data, self.block_size, self.packing = data, block_size, packing
        self.pad_id, self.seed, self.shuffle, self.mixture = pad_id, seed, shuffle, mixture
        self.lengths = np.asarray(getattr(data, 'lengths', None) if getattr(data, 'lengths', None) is not None
                                  else [len(data[i][0]) for i in range(len(data))], dtype=np.int64)
        # examples cut to block_size when batched (reported, never silent): counted once, here
        self.truncated = int((self.lengths > block_size).sum())
        self._cache = (None, None)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]

    def units(self, epoch: int) -> list[list[int]]:
        if self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.data)
        if self.mixture is not None:
            order = self.mixture.order(epoch)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        units = pack_best_fit(order, self.lengths, self.block_size) if self.packing else Singletons(order)
        self._cache = (epoch, units)
        return units

    def collate(self, units: list[list[int]]) -> dict[str, torch.Tensor]:
        return self._collate_packed(units) if self.packing else self._collate_padded(units)

    def _example(self, i):
        ids, labels = self.data[i]
        ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        if len(ids) > self.block_size:
            ids, labels = ids[:self.block_size], labels[:self.block_size]
        return ids, labels

    def _collate_padded(self, units):
        examples = [self._example(u[0]) for u in units]
        T = max(1, max(len(e[0]) for e in examples))
        x = np.full((len(units), T), self.pad_id, dtype=np.int64)
        y = np.full((len(units), T), IGNORE_INDEX, dtype=np.int64)
        for r, (ids, labels) in enumerate(examples):
            # Right padding + causal attention: real tokens never see the pads, so no mask is needed.
            x[r, :len(ids)], y[r, :len(ids)] = ids, labels
        return {'input_ids': torch.from_numpy(x), 'labels': torch.from_numpy(y)}

    def _collate_packed(self, units):
        """Rows of best-fit packed examples. doc_ids number the documents of each row (the pad tail
        is one of its own); cu_seqlens (int32) are the documents' start offsets in the flattened
        B*T tokens plus B*T at the end: the boundaries the attention kernels take, made here on the
        host so the model needs no device sync to read them."""
        B, T = len(units), self.block_size
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        doc = np.zeros((B, T), dtype=np.int64)
        starts = []
        for r, unit in enumerate(units):
            t = 0
            for d, i in enumerate(unit):
                ids, labels = self._example(i)
                n = len(ids)
                x[r, t:t + n], y[r, t:t + n] = ids, labels
                y[r, t] = IGNORE_INDEX   # a document's first token is never a target of the one before
                pos[r, t:t + n] = np.arange(n)
                doc[r, t:t + n] = d
                starts.append(r * T + t)
                t += n
            if t < T:  # the pad tail is a document of its own, so no real token attends to it
                doc[r, t:] = len(unit)
                pos[r, t:] = np.arange(T - t)
                starts.append(r * T + t)
        cu = np.array(starts + [B * T], dtype=np.int32)
        return {'input_ids': torch.from_numpy(x), 'labels': torch.from_numpy(y),
                'position_ids': torch.from_numpy(pos), 'doc_ids': torch.from_numpy(doc),
                'cu_seqlens': torch.from_numpy(cu)}


class GlobalSampler:
    """
    World-size-invariant order. Optimizer step k takes the next G = world_size * grad_accum *
    batch_size units of the global per-epoch order (crossing into the next epoch when one runs out);
    rank r, micro-step m take a fixed slice of those G. So the set of examples in a step does not
    depend on how G is split. The cursor (epoch, position) is all that resume needs.
    """

    def __init__(self, dataset: SFTDataset, epoch=0, position=0):
        if len(dataset) == 0:
            raise DataError("the training split has no examples")
        self.dataset, self.epoch, self.position = dataset, epoch, position

    def take(self, n: int) -> list[list[int]]:
        out = []
        while len(out) < n:
            units = self.dataset.units(self.epoch)
            k = min(n - len(out), len(units) - self.position)
            out.extend(units[self.position:self.position + k])
            self.position += k
            if self.position >= len(units):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_step(self, world_size, rank, grad_accum, batch_size) -> list[list[list[int]]]:
        """The micro-batches (lists of units) of this rank for the next optimizer step."""
        per_rank = grad_accum * batch_size
        step = self.take(world_size * per_rank)
        mine = step[rank * per_rank:(rank + 1) * per_rank]
        return [mine[m * batch_size:(m + 1) * batch_size] for m in range(grad_accum)]

    def state_dict(self):
        return {'epoch': self.epoch, 'position': self.position}


def eval_batches(dataset: SFTDataset, units, n_batches, world_size, rank, batch_size):
    """Fixed eval batches: the first n_batches * batch_size units (all, if fewer; none twice), the
    same set on any number of ranks, dealt out to them, so the loss does not depend on the GPU count.
    Every rank yields as many batches (an FSDP forward is a collective): a rank short of units gets a
    batch whose labels are all ignored (no tokens, no loss)."""
    total = min(len(units), n_batches * batch_size)
    mine = [units[i] for i in range(rank, total, world_size)]
    per_rank = -(-total // world_size)                 # ceil: rank 0 has the most
    for b in range(-(-per_rank // batch_size)):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        if chunk:
            yield dataset.collate(chunk)
        else:
            batch = dataset.collate(units[:1])
            batch['labels'].fill_(IGNORE_INDEX)
            yield batch


def check_token_ids(split, model_vocab: int, where: str):
    """Scan the tokens once (memory-mapped, fast): an id past the embedding would crash mid-run."""
    tokens = getattr(split, 'tokens', None)
    if tokens is None:
        tokens = np.concatenate([e[0] for e in split.examples]) if len(split) else np.zeros(0, np.int64)
    if len(tokens) and int(tokens.max()) >= model_vocab:
        pos = int(np.argmax(tokens >= model_vocab))
        raise DataError(f"{where}: token id {int(tokens[pos])} at token {pos} does not fit the model's "
                         f"vocab_size {model_vocab} (data tokenized with another tokenizer, or a damaged shard)")
