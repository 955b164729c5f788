"""Plot one or several training runs: run_*.json -> PNG of loss, eval and learning-rate curves.

    python plot_run.py out-demo/run_*.json --out out-demo/loss.png

Top panel: train loss per iteration (line) and the periodic eval's val loss (points) against
iteration, with the number of tokens seen on a second x-axis. Middle panel (when the run had
gen_eval_data): the generation evals' accuracy (solid) and format compliance (dashed), in percent.
Bottom panel: learning rate.
Several runs share the axes (one colour each), e.g. a base run and its SFT run.
matplotlib is an optional extra (`make demo` installs it); it is imported only here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from progress import check_out_file


def load_run(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            run = json.load(f)
    except OSError as e:
        raise SystemExit(f'plot_run: cannot read {path}: {e.strerror}')
    except json.JSONDecodeError as e:
        raise SystemExit(f'plot_run: {path}:{e.lineno}: not valid JSON ({e.msg}); '
                         'is the run still writing it?')
    except UnicodeDecodeError:   # a glob like out-demo/* also catches ckpt.pt and loss.png
        raise SystemExit(f'plot_run: {path}: not a JSON text file (binary data: is it a checkpoint?); '
                         'expected a run_*.json written by train_sft.py')
    if not isinstance(run, dict) or not isinstance(run.get('iters'), list):
        raise SystemExit(f"plot_run: {path}: no 'iters' list; expected a run_*.json written by "
                         'train_sft.py')
    for i, rec in enumerate(run['iters']):
        if not isinstance(rec, dict) or 'iter' not in rec or 'loss' not in rec:
            raise SystemExit(f"plot_run: {path}: iters[{i}] lacks 'iter' or 'loss'")
    return run


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('plot_run: matplotlib is not installed; it is an optional extra: '
                         '.venv/bin/pip install matplotlib (make demo installs it)')
    matplotlib.use('Agg')  # files only: works without a display
    import matplotlib.pyplot as plt
    return plt


def tokens_seen(run: dict) -> dict[int, int]:
    """iteration -> tokens seen since the run started. train_sft logs the tokens of each log
    interval, so this is their running sum, from 0 one interval before the first log line."""
    logged = [(r['iter'], r['tokens']) for r in run['iters'] if r.get('tokens') is not None]
    if len(logged) < 2:
        return {}
    start = max(0, logged[0][0] - (logged[1][0] - logged[0][0]))
    seen = np.cumsum([0] + [t for _, t in logged]).tolist()
    return dict(zip([start] + [i for i, _ in logged], seen))


def _interp(v, xp, fp):
    """np.interp, but extended linearly past both ends (the axes' margins lie outside the data,
    and clamping there would stack tick labels on the last value)."""
    v = np.asarray(v, dtype=float)
    y = np.interp(v, xp, fp)
    lo, hi = v < xp[0], v > xp[-1]
    y[lo] = fp[0] + (v[lo] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    y[hi] = fp[-1] + (v[hi] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return y


def _human(v: float) -> str:
    for unit, scale in (('B', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(v) >= scale:
            return f'{v / scale:g}{unit}'
    return f'{v:g}'


def gen_evals(run: dict) -> list[tuple[int, float | None, float | None]]:
    """(iteration, accuracy, format compliance) of the run's generation evals."""
    return [(e['iter'], e.get('accuracy'), e.get('format_compliance')) for e in run.get('evals', [])
            if e.get('accuracy') is not None or e.get('format_compliance') is not None]


def figure(runs: list[tuple[str, dict]], title: str | None = None):
    """The matplotlib figure of the runs (see the module docstring)."""
    plt = import_pyplot()
    paths = [p for p, _ in runs]
    with_gen = any(gen_evals(run) for _, run in runs)
    if with_gen:
        fig, (ax_loss, ax_gen, ax_lr) = plt.subplots(3, 1, figsize=(9, 9), sharex=True,
                                                     gridspec_kw={'height_ratios': [3, 2, 1.3]})
    else:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                             gridspec_kw={'height_ratios': [3, 1.3]})
    tokens_at = {}  # iteration -> tokens seen, for the second x-axis (first run's scale)
    for k, (path, run) in enumerate(runs):
        color = f'C{k}'
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or os.path.basename(path)
        if len(runs) > 1 and len({os.path.dirname(os.path.abspath(p)) for p in paths}) == 1:
            label = os.path.basename(path)
        its = run['iters']
        x = [r['iter'] for r in its]
        ax_loss.plot(x, [r['loss'] for r in its], color=color, lw=1, alpha=0.8,
                     label=f'{label} train')
        evals = [e for e in run.get('evals', []) if e.get('val_loss') is not None]
        if evals:
            ax_loss.plot([e['iter'] for e in evals], [e['val_loss'] for e in evals], 'o--',
                         color=color, ms=5, label=f'{label} val')
        gen = gen_evals(run)
        if gen:
            acc = [(i, 100 * a) for i, a, _ in gen if a is not None]
            fmt = [(i, 100 * f) for i, _, f in gen if f is not None]
            if acc:
                ax_gen.plot(*zip(*acc), 'o-', color=color, ms=4, label=f'{label} accuracy')
            if fmt:
                ax_gen.plot(*zip(*fmt), 's--', color=color, ms=3, alpha=0.6, label=f'{label} format')
        lrs = [(r['iter'], r['lr']) for r in its if r.get('lr') is not None]
        if lrs:
            ax_lr.plot(*zip(*lrs), color=color, lw=1.2)
        if k == 0:
            tokens_at = tokens_seen(run)
    ax_loss.set_ylabel('loss (mean over trained tokens)')
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    if with_gen:
        ax_gen.set_ylabel('generation eval (%)')
        ax_gen.set_ylim(-3, 103)
        ax_gen.grid(alpha=0.3)
        ax_gen.legend(fontsize=8)
    ax_lr.set_ylabel('learning rate')
    ax_lr.set_xlabel('iteration')
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    if len(tokens_at) >= 2:
        # Tokens grow ~linearly with iterations; interpolate so the top axis labels tokens seen.
        xi = np.array(sorted(tokens_at), dtype=float)
        ti = np.array([tokens_at[i] for i in sorted(tokens_at)], dtype=float)
        sec = ax_loss.secondary_xaxis('top', functions=(lambda v: _interp(v, xi, ti),
                                                        lambda v: _interp(v, ti, xi)))
        sec.set_xlabel('tokens seen' + (' (first run)' if len(runs) > 1 else ''))
        sec.xaxis.set_major_formatter(lambda v, _: _human(v))
    fig.suptitle(title or 'nanoSFT: ' + ', '.join(os.path.basename(p) for p in paths), fontsize=10)
    fig.tight_layout()
    return fig


def check_out(out: str) -> None:
    """The output path checked before anything is read or drawn: a directory, a path under a file
    or a format matplotlib cannot write is refused by name. Missing folders are fine: plot_runs
    creates them."""
    try:
        check_out_file(out, 'loss.png')
    except ValueError as e:
        raise SystemExit(f'plot_run: {e}') from None
    import_pyplot()
    from matplotlib.backend_bases import FigureCanvasBase
    kinds = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(out)[1][1:].lower()
    if ext and ext not in kinds:   # no extension: PNG
        raise SystemExit(f'plot_run: --out {out}: matplotlib cannot write .{ext} files; use one of '
                         f'{", ".join(sorted(kinds))}')


def plot_runs(paths: list[str], out: str, title: str | None = None) -> str:
    check_out(out)
    runs = [(p, load_run(p)) for p in paths]
    fig = figure(runs, title)
    plt = import_pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    root, ext = os.path.splitext(out)
    tmp = f'{root}.tmp{os.getpid()}{ext or ".png"}'  # keep the extension: it picks the format
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='+', help='run_*.json files written by train_sft.py')
    p.add_argument('--out', default=None, help='PNG path (default: next to the first run, loss.png)')
    p.add_argument('--title', default=None)
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.runs[0])), 'loss.png')
    print(f'wrote {plot_runs(args.runs, out, args.title)}', file=sys.stderr)


if __name__ == '__main__':
    main()
