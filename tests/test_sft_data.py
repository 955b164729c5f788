"""Tests for sft_data.py: data order, sampler cursor, padding and packing."""
import numpy as np
import pytest
import torch

from chat_records import DataError
from sft_data import IGNORE_INDEX, GlobalSampler, Mixture, SFTDataset, eval_batches, pack_best_fit


class ListSplit:
    """In-memory stand-in for sft_data.ShardDataset."""

    def __init__(self, examples):
        self.examples = [(np.asarray(i, dtype=np.int64), np.asarray(l, dtype=np.int64)) for i, l in examples]
        self.lengths = np.array([len(e[0]) for e in self.examples], dtype=np.int64)
        self.meta = {}

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def synthetic(n=37, seed=0, max_len=20):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(2, max_len))
        ids = rng.integers(0, 1000, L)
        labels = np.where(np.arange(L) >= L // 2, ids, IGNORE_INDEX)
        out.append((ids, labels))
    return ListSplit(out)


# ---------------------------------------------------------------- data order

@pytest.mark.parametrize('packing', [False, True])
def test_step_examples_do_not_depend_on_how_the_global_batch_is_split(packing):
    ds = SFTDataset(synthetic(), block_size=24, packing=packing, seed=3)
    splits = [(1, 1, 8), (1, 8, 1), (2, 2, 2), (4, 1, 2), (8, 1, 1)]   # world, accum, batch: G = 8
    per_split = []
    for world, accum, bs in splits:
        samplers = [GlobalSampler(ds) for _ in range(world)]
        steps = []
        for _ in range(12):   # crosses several epochs
            seen = []
            for r in range(world):
                for micro in samplers[r].next_step(world, r, accum, bs):
                    assert len(micro) == bs
                    seen += [tuple(u) for u in micro]
            steps.append(sorted(seen))
        per_split.append(steps)
    assert all(s == per_split[0] for s in per_split)


def test_each_epoch_is_a_seeded_permutation_and_ranks_are_disjoint():
    ds = SFTDataset(synthetic(n=16), block_size=64, seed=5)
    assert sorted(u[0] for u in ds.units(0)) == list(range(16))
    assert ds.units(0) != ds.units(1)
    assert SFTDataset(synthetic(n=16), block_size=64, seed=5).units(1) == ds.units(1)
    s0, s1 = GlobalSampler(ds), GlobalSampler(ds)
    a = [u[0] for m in s0.next_step(2, 0, 2, 2) for u in m]
    b = [u[0] for m in s1.next_step(2, 1, 2, 2) for u in m]
    assert not set(a) & set(b)


def test_sampler_cursor_restores_the_stream():
    ds = SFTDataset(synthetic(n=10), block_size=64, seed=1)
    s = GlobalSampler(ds)
    for _ in range(3):
        s.take(4)
    state = s.state_dict()
    assert state == {'epoch': 1, 'position': 2}
    rest = [s.take(4) for _ in range(5)]
    t = GlobalSampler(ds, **state)
    assert [t.take(4) for _ in range(5)] == rest


# ---------------------------------------------------------------- weighted mixtures

def three_sources(seed=0):
    """A big chat source, a small math source (to upsample), a mid-sized one; varied lengths."""
    rng = np.random.default_rng(seed)
    sizes = [(0, 700, 40), (1, 60, 12), (2, 240, 80)]   # source, examples, longest trained span
    examples, sources = [], []
    for k, n, longest in sizes:
        for _ in range(n):
            t = int(rng.integers(1, longest))
            ids = rng.integers(0, 1000, t + 5)
            examples.append((ids, np.where(np.arange(t + 5) >= 5, ids, IGNORE_INDEX)))
            sources.append(k)
    perm = rng.permutation(len(sources))   # sources interleaved in the split, as prepare writes them
    split = ListSplit([examples[i] for i in perm])
    trained = np.array([int((split[i][1] != IGNORE_INDEX).sum()) for i in range(len(split))])
    return split, np.array(sources)[perm], trained


@pytest.mark.parametrize('by', ['examples', 'tokens'])
def test_mixture_realizes_the_weights_within_1_percent_every_epoch(by):
    split, sources, trained = three_sources()
    weights = [0.5, 0.3, 0.2]
    mix = Mixture(sources, weights, by, trained, seed=7)
    for epoch in range(6):
        order = mix.order(epoch)
        measure = np.ones(len(order)) if by == 'examples' else trained[order]
        realized = [measure[sources[order] == k].sum() / measure.sum() for k in range(3)]
        assert np.allclose(realized, weights, atol=0.01), (epoch, realized)
        report = mix.report(epoch)
        assert [r['example_share' if by == 'examples' else 'token_share'] for r in report] == \
            pytest.approx(realized)
    # the epoch is as large as the split: its examples, or its trained tokens
    size = len(mix.order(0)) if by == 'examples' else trained[mix.order(0)].sum()
    assert size == pytest.approx(len(split) if by == 'examples' else trained.sum(), rel=0.01)


def test_upsampled_source_repeats_every_example_in_a_new_seeded_order_and_downsampled_reaches_all():
    split, sources, trained = three_sources()
    mix = Mixture(sources, [0.5, 0.3, 0.2], 'examples', trained, seed=7)
    small = np.flatnonzero(sources == 1)          # 60 examples asked to fill 30% of 1000 = 300 slots
    stream = np.concatenate([mix.picks(1, e) for e in range(2)])
    cycles = [stream[c * 60:(c + 1) * 60] for c in range(len(stream) // 60)]
    assert len(cycles) == 10 and all(sorted(c) == sorted(small) for c in cycles)
    assert len({tuple(c) for c in cycles}) == 10  # a new order each time through
    big = np.flatnonzero(sources == 0)            # 700 examples with 500 slots per epoch
    seen = np.concatenate([mix.picks(0, e) for e in range(2)])
    assert set(seen) == set(big) and len(seen) == 1000
    # a pure function of (seed, epoch): a fresh Mixture gives the same epoch 5 without epochs 0-4
    assert Mixture(sources, [0.5, 0.3, 0.2], 'examples', trained, seed=7).order(5).tolist() == mix.order(5).tolist()
    assert Mixture(sources, [0.5, 0.3, 0.2], 'examples', trained, seed=8).order(5).tolist() != mix.order(5).tolist()


@pytest.mark.parametrize('packing', [False, True])
def test_mixture_sample_order_is_identical_on_1_and_2_ranks_and_resumes_from_the_cursor(packing):
    split, sources, trained = three_sources()

    def dataset():
        return SFTDataset(split, block_size=96, packing=packing, seed=11,
                          mixture=Mixture(sources, [0.5, 0.3, 0.2], 'tokens', trained, seed=11))
    one = GlobalSampler(dataset())
    two = [GlobalSampler(dataset()) for _ in range(2)]
    steps = []
    for step in range(150):   # several epochs (~2,500 examples by tokens, 32 rows a step)
        a = [tuple(u) for m in one.next_step(1, 0, 4, 8) for u in m]
        b = [tuple(u) for r in range(2) for m in two[r].next_step(2, r, 2, 8) for u in m]
        assert a == b, step   # the same units in the same global order
        steps.append(a)
        if step == 99:
            state = one.state_dict()
    assert state['epoch'] >= 1
    resumed = GlobalSampler(dataset(), **state)   # a resumed run: a fresh dataset and the cursor
    assert [[tuple(u) for m in resumed.next_step(1, 0, 4, 8) for u in m] for _ in range(50)] == steps[100:]


def test_bad_mixtures_are_clear_errors():
    split, sources, trained = three_sources()
    for weights in ([0.5, 0, 0.5], [0.5, -1, 0.5], [float('nan'), 1, 1]):
        with pytest.raises(DataError, match='weights must be positive'):
            Mixture(sources, weights, 'examples', trained)
    with pytest.raises(DataError, match="source 'math' has weight 0.3 but no examples"):
        Mixture(np.zeros(len(sources)), [0.5, 0.3], 'examples', trained, names=['chat', 'math'])
    with pytest.raises(DataError, match='mixture_by'):
        Mixture(sources, [1, 1, 1], 'rows', trained)


# ---------------------------------------------------------------- batching

@pytest.mark.parametrize('packing', [False, True])
@pytest.mark.parametrize('n_batches', [3, 100])
def test_eval_batches_are_the_same_units_once_each_on_any_number_of_ranks(packing, n_batches):
    """Else the val loss (and so ckpt_best.pt and early stopping) would change with the GPU count."""
    ds = SFTDataset(synthetic(n=37), block_size=24, packing=packing, shuffle=False)
    units = ds.units(0)

    def totals(batches):   # (sum of the trained labels, their count): a repeat or a miss changes it
        labels = [b['labels'][b['labels'] != IGNORE_INDEX] for b in batches]
        return sum(int(x.sum()) for x in labels), sum(len(x) for x in labels)

    expect = totals([ds.collate(units[:n_batches * 4])])
    for world in (1, 2, 3, 8):
        per_rank = [list(eval_batches(ds, units, n_batches, world, rank, batch_size=4)) for rank in range(world)]
        assert len({len(b) for b in per_rank}) == 1, world    # as many forwards on every rank (FSDP)
        assert tuple(map(sum, zip(*map(totals, per_rank)))) == expect, world


def test_padding_pads_to_longest_and_truncates_to_block_size():
    split = ListSplit([([1, 2, 3], [-100, 2, 3]), ([4, 5, 6, 7, 8, 9, 10], [-100] * 3 + [7, 8, 9, 10])])
    ds = SFTDataset(split, block_size=5, pad_id=151643)
    b = ds.collate([[0]])
    assert b['input_ids'].tolist() == [[1, 2, 3]]
    b = ds.collate([[0], [1]])
    assert b['input_ids'].tolist() == [[1, 2, 3, 151643, 151643], [4, 5, 6, 7, 8]]
    assert b['labels'].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, -100, 7, 8]]
    ds.collate([[1]])
    assert ds.truncated == 1     # examples, not the times one is batched (epochs, evaluations)


def test_packing_restarts_positions_and_separates_documents():
    split = ListSplit([([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9, 10, 11], [6] * 6)])
    ds = SFTDataset(split, block_size=6, packing=True, pad_id=0, shuffle=False)
    rows = ds.units(0)
    assert rows == [[0, 1], [2]] == pack_best_fit([0, 1, 2], split.lengths, 6)
    b = ds.collate(rows)
    assert b['input_ids'].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11]]
    # first token of every document is never a target (no cross-document prediction); pad is ignored
    assert b['labels'].tolist() == [[-100, 2, 3, -100, 5, -100], [-100, 6, 6, 6, 6, 6]]
    assert b['position_ids'].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert b['doc_ids'].tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    # the same boundaries as offsets into the flattened rows, for the attention kernels
    assert b['cu_seqlens'].dtype == torch.int32
    assert b['cu_seqlens'].tolist() == [0, 3, 5, 6, 12]


def test_packing_truncates_an_example_longer_than_block_size():
    split = ListSplit([(list(range(10)), list(range(10))), ([1, 2], [1, 2])])
    ds = SFTDataset(split, block_size=4, packing=True, shuffle=False)
    assert ds.units(0) == [[0], [1]]
    assert ds.collate([[0]])['input_ids'].tolist() == [[0, 1, 2, 3]]
    assert ds.truncated == 1


def test_best_fit_fills_the_row_with_least_room_that_fits():
    # next-fit would close row 0 at the 6 and leave its 3 free slots unused
    assert pack_best_fit([0, 1, 2, 3], np.array([5, 6, 3, 4]), 8) == [[0, 2], [1], [3]]
    # every example is placed exactly once, in no row over block_size (a too-long one counts as block_size)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    rows = pack_best_fit(rng.permutation(500), lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(min(int(lengths[i]), 256) for i in r) <= 256 for r in rows)


def test_gsm8k_packs_with_under_5_percent_padding_at_block_1024(gsm8k_train):
    import json
    path = gsm8k_train
    from chat_format import encode_conversation
    from tokenizer import load_tokenizer
    tok = load_tokenizer('qwen3')
    with open(path) as f:
        records = [json.loads(line) for line in f]
    lengths = np.array([len(encode_conversation([{'role': 'user', 'content': r['question']},
                                                 {'role': 'assistant', 'content': r['answer']}], tok)[0])
                        for r in records])
    order = np.random.default_rng(1337).permutation(len(lengths))
    rows = pack_best_fit(order, lengths, 1024)
    padding = 1 - lengths.sum() / (len(rows) * 1024)
    assert padding < 0.05, f"padding share {padding:.2%}"


def test_shard_writer_records_digests_that_catch_a_flipped_byte(tmp_path):
    from sft_data import ShardDataset, ShardWriter
    with ShardWriter(str(tmp_path / 'd'), np.uint16) as w:
        for n in (3, 5, 4):
            w.add('train', np.arange(n), np.ones(n, dtype=np.uint8))
        w.add('val', np.arange(2), np.ones(2, dtype=np.uint8))
        meta = w.commit({'tokenizer': {'name': 't'}})
    assert sorted(meta['sha256']) == sorted(f'{s}.{e}' for s in ('train', 'val') for e in ('bin', 'mask', 'idx', 'src'))
    assert len(ShardDataset(str(tmp_path / 'd'), 'train', verify=True)) == 3
    data = bytearray((tmp_path / 'd' / 'train.mask').read_bytes())
    data[4] ^= 1                               # a trained token becomes masked: same size, same range
    (tmp_path / 'd' / 'train.mask').write_bytes(bytes(data))
    assert len(ShardDataset(str(tmp_path / 'd'), 'train')) == 3   # the structure checks cannot see it
    with pytest.raises(DataError, match=r'train\.mask: damaged shard'):
        ShardDataset(str(tmp_path / 'd'), 'train', verify=True)
    assert len(ShardDataset(str(tmp_path / 'd'), 'val', verify=True)) == 1   # per split
    data = bytearray((tmp_path / 'd' / 'val.src').read_bytes())
    data[0] ^= 1                               # an example moved to another source: caught too
    (tmp_path / 'd' / 'val.src').write_bytes(bytes(data))
    with pytest.raises(DataError, match=r'val\.src: damaged shard'):
        ShardDataset(str(tmp_path / 'd'), 'val', verify=True)
