"""Smoke test of benchmarks/bench_train.py: the contenders still run end to end on a tiny config, so
CI catches breakage of the benchmark (or of the nanoSFT APIs it drives)."""
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_train  # noqa: E402


def _tiny_data(tmp_path, n=8):
    path = tmp_path / 'gsm8k.jsonl'
    with open(path, 'w') as f:
        for i in range(n):
            f.write(json.dumps({'question': f'Tom has {i} apples and buys {i + 2} more. How many?',
                                'answer': f'{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n'
                                          f'#### {2 * i + 2}'}) + '\n')
    return str(path)


def _run(tmp_path, contenders):
    out = tmp_path / 'out.json'
    rc = bench_train.main(['--contenders', contenders, '--data', _tiny_data(tmp_path),
                           '--batch_size', '2', '--max_length', '128', '--block_size', '128',
                           '--warmup', '0', '--steps', '1', '--n_layer', '1', '--n_embd', '32',
                           '--n_head', '2', '--n_kv_head', '1', '--intermediate', '64',
                           '--threads', '1', '--device', 'cpu', '--padding_block_size', '128',
                           '--workdir', str(tmp_path), '--json', str(out)])
    return rc, json.loads(out.read_text())


@pytest.mark.slow
def test_nanosft_and_transformers_contenders_run_and_agree_on_trained_tokens(tmp_path):
    rc, res = _run(tmp_path, 'nanosft,nanosft_padded,hf')
    assert rc == 0, [r.get('error') for r in res['results']]
    by = {r['contender']: r for r in res['results']}
    assert set(by) == {'nanosft', 'nanosft_padded', 'hf'}
    for r in by.values():
        assert r['trained_tokens'] > 0 and r['trained_tok_s'] > 0 and r['peak_rss_bytes'] > 0
    assert res['sanity']['same_trained_tokens_per_example'], res['sanity']
    # same weights, same batch, same tokens: the unpacked nanoSFT loss is the transformers loss
    assert by['nanosft_padded']['first_loss'] == pytest.approx(by['hf']['first_loss'], abs=1e-4)
    assert 0.0 <= res['gsm8k_padding']['packing_share'] < 1.0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('trl') is None, reason='trl not installed (benchmark extra)')
def test_trl_contender_runs(tmp_path):
    rc, res = _run(tmp_path, 'trl')
    assert rc == 0, res['results'][0].get('error')
    assert res['results'][0]['trained_tokens'] > 0
