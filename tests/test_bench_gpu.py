"""Smoke test of benchmarks/bench_gpu.py on CPU (tiny preset, no compile): the batch-size search,
the subprocess per run, the FLOP accounting and the table, so the GPU benchmark is not first run on
a lent GPU. The CUDA numbers themselves need a GPU (tests marked gpu)."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_gpu  # noqa: E402
from test_bench_train import _tiny_data  # noqa: E402


def _run(tmp_path, *extra):
    out = tmp_path / 'gpu.json'
    rc = bench_gpu.main(['--device', 'cpu', '--presets', 'tiny', '--block_size', '128',
                         '--dtype', 'float32', '--no_compile', '--warmup', '1', '--steps', '1',
                         '--data', _tiny_data(tmp_path, n=40), '--json', str(out), *extra])
    return rc, json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_smoke_run_reports_throughput_and_flop_accounting(tmp_path, capsys):
    rc, res = _run(tmp_path, '--batch_sizes', '1,2', '--peak_tflops', '1', '--activation_checkpointing', 'full')
    assert rc == 0, res['results']
    r1, r2 = res['results']
    assert (r1['batch_size'], r2['batch_size']) == (1, 2)
    from model_config import ModelArchitectureConfig
    cfg = ModelArchitectureConfig.from_preset('tiny', block_size=128)
    for r in (r1, r2):
        assert r['tok_s'] > 0 and 0 < r['trained_share'] < 1 and r['peak_mem_bytes'] > 0
        # MFU counts the full LM head on every token; hw_util only the trained tokens' head
        assert r['mfu'] == pytest.approx(r['tok_s'] * cfg.flops_per_token(128) / 1e12)
        assert 0 < r['hw_util'] < r['mfu']
        # the document-masked path and the checkpointed blocks ran; the planner's guess is beside the peak
        assert r['attention'] == 'per_doc' and r['activation_checkpointing'] == 'full'
        assert r['planned_peak_bytes'] > 0
    table = capsys.readouterr().out
    assert '| tiny | 2 |' in table and 'largest batch that fits: 2 rows' in table


@pytest.mark.slow
def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='GSM8K not found'):
        bench_gpu.main(['--device', 'cpu', '--data', str(tmp_path / 'nope.jsonl')])


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_run_with_compile_reports_mfu_against_the_gpu_peak(tmp_path):
    out = tmp_path / 'gpu.json'
    rc = bench_gpu.main(['--presets', 'tiny', '--block_size', '128', '--batch_sizes', '1,2',
                         '--warmup', '2', '--steps', '2', '--data', _tiny_data(tmp_path, n=40),
                         '--activation_checkpointing', 'selective', '--json', str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, res['results']
    for r in res['results']:
        assert r['compile'] and r['dtype'] == 'bfloat16' and r['device'].startswith('cuda')
        assert r['attention'] == 'varlen' and r['activation_checkpointing'] == 'selective'
        assert r['tok_s'] > 0 and 0 < r['mfu'] < 1 and r['peak_mem_bytes'] > 0
