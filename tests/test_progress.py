"""progress.py: plain lines with an ETA when redirected, and output that never kills the program."""
import io
import os
import subprocess
import sys

import progress
from progress import Progress, fmt_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_redirected_progress_prints_whole_lines_with_rate_elapsed_and_eta(monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(progress.time, 'time', lambda: float(next(clock)))
    out = io.StringIO()
    bar = Progress(100, 'encoding', 'ex', every=15, out=out)   # StringIO is no tty: plain lines
    for _ in range(4):
        bar.update(20)
    bar.write('a log line')
    bar.close()
    lines = out.getvalue().splitlines()
    assert '\r' not in out.getvalue()
    assert lines[0] == 'encoding: 40/100 ex (40%), 2.0 ex/s, elapsed 0:20, ETA 0:30'
    assert 'a log line' in lines and lines[-1].startswith('encoding: 80/100 ex (80%)')
    assert fmt_seconds(3725) == '1:02:05'


def test_a_disabled_progress_prints_nothing():
    out = io.StringIO()
    bar = Progress(10, 'x', every=0, enabled=False, out=out)
    bar.update(5)
    bar.write('rank 1 line')
    bar.close()
    assert out.getvalue() == ''


def test_say_survives_a_closed_pipe_and_the_exit_stays_clean():
    code = ("import sys, time; sys.path.insert(0, %r); from progress import say\n"
            "say('first'); time.sleep(0.5)\n"
            "for i in range(1000): say('line', i)\n"
            "print('still running', file=sys.stderr)\n") % ROOT
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b'first\n'
    proc.stdout.close()   # the reader goes away, as tee does on Ctrl-C
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 0 and 'still running' in err and 'Traceback' not in err, err
    assert 'Exception ignored' not in err   # the flush at exit does not complain either


def test_say_survives_a_full_disk():
    code = "import sys; sys.path.insert(0, %r); from progress import say\nsay('x' * 100000)\nprint('ok', file=sys.stderr)\n" % ROOT
    with open('/dev/full', 'w') as full:
        proc = subprocess.run([sys.executable, '-c', code], stdout=full, stderr=subprocess.PIPE, timeout=30)
    assert proc.returncode == 0 and proc.stderr.decode().strip() == 'ok', proc.stderr


def test_progress_without_a_total_counts_what_streamed_past(monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(progress.time, 'time', lambda: float(next(clock)))
    out = io.StringIO()
    bar = Progress(None, 'encoding', 'ex', every=15, out=out)   # prepare_sft streams: no total known
    for _ in range(4):
        bar.update(20)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == 'encoding: 40 ex, 2.0 ex/s, elapsed 0:20'
    assert lines[-1].startswith('encoding: 80 ex, ')
