import builtins
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plot_run  # noqa: E402


def fake_run(path, n=30, lr=1e-3):
    iters = [{'iter': i, 'loss': 5.0 / (1 + i), 'lr': lr * min(1, (i + 1) / 5), 'grad_norm': 1.0,
              'tokens': 512, 'trained_tokens': 100, 'tok_per_s': 1e3,
              'time': 0.1 * i} for i in range(n)]
    evals = [{'iter': i, 'train_loss': 5.0 / (1 + i), 'val_loss': 5.5 / (1 + i)} for i in (0, 10, 20)]
    path.write_text(json.dumps({'config': {}, 'iters': iters, 'evals': evals, 'summary': {}}))
    return str(path)


def test_writes_png_for_one_and_several_runs(tmp_path):
    pytest.importorskip('matplotlib')
    a, b = fake_run(tmp_path / 'run_a.json'), fake_run(tmp_path / 'run_b.json', lr=3e-4)
    out = tmp_path / 'plots' / 'loss.png'
    subprocess.run([sys.executable, os.path.join(ROOT, 'plot_run.py'), a, b, '--out', str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not [f for f in os.listdir(out.parent) if 'tmp' in f]
    plot_run.plot_runs([a], str(tmp_path / 'one.png'))
    assert (tmp_path / 'one.png').stat().st_size > 1000


def test_bad_run_file_is_a_clear_error(tmp_path):
    bad = tmp_path / 'run_x.json'
    bad.write_text('{"iters": [')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'plot_run.py'), str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and 'run_x.json' in r.stderr and 'Traceback' not in r.stderr
    bad.write_text('{"evals": []}')
    with pytest.raises(SystemExit, match="no 'iters'"):
        plot_run.load_run(str(bad))


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith('matplotlib'):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, '__import__', no_mpl)
    with pytest.raises(SystemExit, match='pip install matplotlib'):
        plot_run.import_pyplot()


def test_tokens_axis_counts_from_zero_at_the_runs_start():
    logged = lambda its: {'iters': [{'iter': i, 'loss': 1.0, 'tokens': 100 * i} for i in its]}
    # logs every 10 steps of a fresh run: 0 tokens at iteration 0, then the running sum
    assert plot_run.tokens_seen(logged([10, 20, 30])) == {0: 0, 10: 1000, 20: 3000, 30: 6000}
    # a run resumed at 200 counts from there
    assert plot_run.tokens_seen(logged([210, 220])) == {200: 0, 210: 21000, 220: 43000}
    assert plot_run.tokens_seen(logged([10])) == {}


def test_axis_mapping_extends_linearly_past_the_data():
    import numpy as np
    xp, fp = np.array([0.0, 10.0, 20.0]), np.array([0.0, 100.0, 300.0])
    assert plot_run._interp([-5, 5, 25], xp, fp).tolist() == [-50.0, 50.0, 400.0]
    assert plot_run._human(1_500_000) == '1.5M' and plot_run._human(250_000) == '250k'


def test_generation_evals_get_a_panel_of_accuracy_and_format(tmp_path):
    pytest.importorskip('matplotlib')
    path = tmp_path / 'run_g.json'
    run = json.loads(open(fake_run(path)).read())
    run['evals'] += [{'iter': i, 'accuracy': a, 'format_compliance': f}
                     for i, a, f in ((5, 0.0, 0.1), (15, 0.4, 0.9), (25, 0.7, 1.0))]
    path.write_text(json.dumps(run))
    assert plot_run.gen_evals(run) == [(5, 0.0, 0.1), (15, 0.4, 0.9), (25, 0.7, 1.0)]
    fig = plot_run.figure([(str(path), plot_run.load_run(str(path)))])
    (gen,) = [ax for ax in fig.axes if ax.get_ylabel() == 'generation eval (%)']
    acc, fmt = gen.get_lines()
    assert acc.get_xdata().tolist() == [5, 15, 25] and acc.get_ydata().tolist() == [0.0, 40.0, 70.0]
    assert fmt.get_ydata().tolist() == [10.0, 90.0, 100.0]
    plain = plot_run.figure([(fake_run(tmp_path / 'run_p.json'), plot_run.load_run(str(tmp_path / 'run_p.json')))])
    assert not [ax for ax in plain.axes if ax.get_ylabel() == 'generation eval (%)']
    plot_run.plot_runs([str(path)], str(tmp_path / 'g.png'))
    assert (tmp_path / 'g.png').stat().st_size > 1000


def test_binary_file_caught_by_a_glob_is_a_clear_error(tmp_path):
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes(b'PK\x03\x04\x00\x00\x08\x08' + bytes(range(128, 256)))   # a zip, as torch.save writes
    with pytest.raises(SystemExit, match=r'ckpt.pt: not a JSON text file \(binary data: is it a checkpoint\?\)'):
        plot_run.load_run(str(ckpt))


@pytest.mark.parametrize('out', ['{tmp}', '{tmp}/new/', '{run}/loss.png', '{tmp}/loss.xyz'])
def test_out_that_cannot_be_written_is_refused_before_plotting(tmp_path, monkeypatch, out):
    pytest.importorskip('matplotlib')
    run = fake_run(tmp_path / 'run_a.json')
    monkeypatch.setattr(plot_run, 'figure', lambda *a, **k: pytest.fail('plotted before --out was checked'))
    out = out.format(tmp=tmp_path, run=run)
    with pytest.raises(SystemExit, match=r'--out .*: (names a directory|cannot write there|matplotlib cannot '
                                         r'write \.xyz files; use one of .*png)'):
        plot_run.plot_runs([run], out)
    assert os.listdir(tmp_path) == ['run_a.json']
