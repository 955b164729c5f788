"""Smoke test of benchmarks/bench_memory.py: a small case end to end (child process, live-tensor and
RSS measurements, the table and the 15% verdict), so the benchmark itself cannot rot unnoticed."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_memory  # noqa: E402
from test_bench_train import _tiny_data  # noqa: E402


@pytest.mark.slow
def test_small_case_runs_and_the_plan_is_within_15_percent_of_what_it_measures(tmp_path, capsys):
    out = tmp_path / 'memory.json'
    rc = bench_memory.main(['--cases', '2x128@256:full:8192', '--threads', '1',
                            '--data', _tiny_data(tmp_path, n=60), '--json', str(out)])
    (r,) = json.loads(out.read_text())['results']
    assert rc == 0, r
    assert r['ac'] == 'full' and r['vocab'] == 8192 and r['tokens'] == 256 and 0 < r['trained'] <= 256
    assert abs(r['planned_peak'] / r['live_peak'] - 1) <= 0.15
    assert '| 2x128, vocab 8,192, 1 x 256 |' in capsys.readouterr().out
