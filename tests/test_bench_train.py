"""Smoke test of benchmarks/bench_train.py: the contenders still run end to end on a tiny shape and
train the same conversations per step, so CI catches breakage of the benchmark (or of the nanoSFT
APIs it drives) before a long benchmark run does."""
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_train  # noqa: E402


def _tiny_data(tmp_path, n=40):
    path = tmp_path / 'gsm8k.jsonl'
    with open(path, 'w') as f:
        for i in range(n):
            f.write(json.dumps({'question': f'Tom has {i} apples and buys {i + 2} more. How many?',
                                'answer': f'{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n'
                                          f'#### {2 * i + 2}'}) + '\n')
    return str(path)


def _run(tmp_path, contenders, *extra):
    out = tmp_path / 'out.json'
    rc = bench_train.main(['--contenders', contenders, '--data', _tiny_data(tmp_path), '--shapes', '1x32',
                           '--block_size', '256', '--warmup', '0', '--steps', '2', '--repeats', '1',
                           '--threads', '1', '--workdir', str(tmp_path), '--json', str(out), *extra])
    return rc, json.loads(out.read_text())


@pytest.mark.slow
def test_contenders_train_the_same_steps_and_packed_transformers_gives_the_padded_loss(tmp_path):
    trl = importlib.util.find_spec('trl') is not None     # the benchmark extra (make install-bench)
    names = {'nanosft', 'hf_packed', 'hf_padded', 'nanosft_dense'} | ({'trl_packed'} if trl else set())
    rc, res = _run(tmp_path, ','.join(sorted(names)))
    assert rc == 0, [r.get('error') for r in res['results']]
    summary = res['summary']['1x32']
    by = {r['contender']: r for r in summary['medians']}
    assert set(by) == names
    for r in by.values():
        assert r['trained_tokens'] > 0 and r['trained_tok_cpu_s'] > 0 and r['peak_rss_bytes'] > 0
    assert summary['sanity']['same_trained_tokens_per_step'], summary
    # same weights, same conversations: packing (position_ids, no cache) changes nothing in transformers,
    # and nanoSFT's loss (either attention path) is transformers'
    assert abs(summary['sanity']['hf_packed_minus_hf_padded_first_loss']) < 1e-5
    assert abs(summary['sanity']['nanosft_minus_hf_padded_first_loss']) < 1e-4
    assert by['nanosft_dense']['first_loss'] == pytest.approx(by['nanosft']['first_loss'], abs=1e-5)
    if trl:   # TRL's own BFD packing made the steps every contender trained
        assert summary['sanity']['trl_packed_the_same_steps'], summary


@pytest.mark.slow
def test_growth_runs_both_attention_paths_at_each_block_size(tmp_path):
    rc, res = _run(tmp_path, 'nanosft', '--growth', '--growth_shape', '1x32', '--growth_blocks', '256')
    assert rc == 0, [r.get('error') for r in res['results']]
    assert set(res['summary']) == {'1x32@256'}
    for s in res['summary'].values():
        assert [r['contender'] for r in s['medians']] == ['nanosft', 'nanosft_dense']
        assert s['medians'][0]['first_loss'] == pytest.approx(s['medians'][1]['first_loss'], abs=1e-5)
