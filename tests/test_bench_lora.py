"""Smoke test of benchmarks/bench_lora.py on the tiny preset: every contender runs end to end in its
own process, so CI catches breakage of the benchmark (or of the LoRA APIs it drives)."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_lora  # noqa: E402


@pytest.mark.slow
def test_every_contender_runs_and_lora_starts_from_the_base(tmp_path):
    pytest.importorskip('trl')
    pytest.importorskip('torchao')
    data = tmp_path / 'gsm8k.jsonl'
    with open(data, 'w') as f:
        for i in range(40):
            f.write(json.dumps({'question': f'Tom has {i} apples and buys {i + 2} more. How many?',
                                'answer': f'{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}'}) + '\n')
    out = tmp_path / 'out.json'
    rc = bench_lora.main(['--preset', 'tiny', '--block_size', '128', '--rank', '4', '--repeats', '1',
                          '--warmup', '1', '--steps', '1', '--threads', '1', '--jobs', '2', '--data', str(data),
                          '--workdir', str(tmp_path), '--json', str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, {k: v.get('error') for k, v in res['medians'].items()}
    med = res['medians']
    assert set(med) == set(bench_lora.CONTENDERS)
    assert all(m['trained_tok_per_cpu_s'] > 0 and m['train_peak_rss_bytes'] > 0 for m in med.values())
    # the same first row, and LoRA at init is the base: the same first loss as full fine-tuning
    assert med['nanosft_lora']['first_loss'] == pytest.approx(med['nanosft_full']['first_loss'], abs=1e-6)
    assert med['nanosft_lora']['trainable_params'] == med['trl_lora']['trainable_params']
    # the weights ship in bf16: holding the frozen projections in bf16 loses nothing
    assert med['nanosft_lora_bf16']['first_loss'] == pytest.approx(med['nanosft_lora']['first_loss'], abs=1e-6)
    bf16 = med['nanosft_lora_bf16']['frozen_base']['projections']
    assert bf16 == med['nanosft_lora']['frozen_base']['projections'] / 2 == med['nanosft_lora_bf16']['bf16_projection_bytes']
    # checkpointing recomputes, it does not change the step
    assert med['nanosft_lora_ac']['first_loss'] == pytest.approx(med['nanosft_lora']['first_loss'], abs=1e-6)
    assert med['trl_lora_gc']['first_loss'] == pytest.approx(med['trl_lora']['first_loss'], abs=1e-5)
    q = med['nanosft_qlora']
    assert 0.25 < q['frozen_base']['projections'] / q['bf16_projection_bytes'] < 0.3
    qe = med['nanosft_qlora_emb']   # the table in NF4 too: the same first loss but for its rounding
    assert (qe['frozen_base']['projections'] + qe['frozen_base']['other']) / qe['bf16_base_bytes'] < 0.3
    assert qe['first_loss'] == pytest.approx(q['first_loss'], abs=0.05)
    # the bf16 autocast pair: the same step in bf16 matmuls, nanoSFT's frozen embedding held in bf16
    amp = med['nanosft_lora_amp']
    assert amp['first_loss'] == pytest.approx(med['nanosft_lora']['first_loss'], abs=0.05)
    assert med['trl_lora_amp']['first_loss'] == pytest.approx(med['trl_lora']['first_loss'], abs=0.05)
    assert amp['frozen_base']['other'] < 0.6 * med['nanosft_lora']['frozen_base']['other']
    assert sum(g.startswith(f'{lo} / {peer} trained tokens per CPU-second') for g in res['goals']
               for lo, peer in bench_lora.PAIRS) == 3
    assert res['goals'][0].startswith('same examples per step for every contender: yes'), res['goals'][0]
