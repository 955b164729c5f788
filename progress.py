"""Progress and log output that reads well for a person at a terminal and for a log file.

- At a terminal (stderr is a tty): a tqdm bar, with log lines printed above it on lines of their own.
- Redirected to a file or a pipe: no bar and no carriage returns; every `every` seconds (and at the
  end) one plain line on stdout: done / total, rate, elapsed time and ETA, so `grep` and `tail -f` work.
- Printing never kills the program: when stdout is a closed pipe (`python train_sft.py ... | tee log`
  and Ctrl-C, which ends tee too) or a full disk, output is switched off instead of raising, so a stop
  can still save its checkpoint.
"""
from __future__ import annotations

import os
import sys
import time


def say(*args, file=None) -> None:
    """print(..., flush=True) that survives a broken or full stdout (or stderr)."""
    f = file or sys.stdout
    try:
        print(*args, file=f, flush=True)
    except OSError:   # EPIPE (reader gone), ENOSPC (disk full), EIO
        silence(f)


def silence(f) -> None:
    """Point the stream's file descriptor at /dev/null: later writes (and the flush at exit, which
    would otherwise print 'Exception ignored ... BrokenPipeError' and exit 120) go nowhere."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, f.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):   # no real descriptor (e.g. captured by a test)
        pass


def check_out_file(path: str, example: str) -> None:
    """An output file's path checked before the work that writes it (minutes of it), not after: a
    directory, or a place that cannot be written, is a ValueError naming it. Missing folders are
    fine: the writer creates them. `example`: a file name to suggest inside a directory."""
    if path.endswith(('/', os.sep)) or os.path.isdir(path):
        raise ValueError(f'--out {path}: names a directory; give a file name, e.g. '
                         f'{os.path.join(path, example)}')
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f'--out {path}: cannot write there ({parent} is not a writable directory)')


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}' if s >= 3600 else f'{s // 60}:{s % 60:02d}'


class Progress:
    """A tqdm bar at a terminal, plain periodic lines otherwise (every=None: no periodic lines, for
    loops that print their own; total=None: a count without a total, for streamed input). write() prints a line of its own in both cases. enabled=False (a
    rank other than 0): silent."""

    def __init__(self, total: int | None, desc: str, unit: str = 'it', initial: int = 0,
                 every: float | None = 30.0, enabled: bool = True, out=None):
        self.total, self.desc, self.unit, self.n, self.every = total, desc, unit, initial, every
        self.out = out   # where plain lines go (default stdout)
        self.enabled, self.bar = enabled, None
        self.t0 = self.t_last = time.time()
        self.start = initial
        if enabled and _is_tty(sys.stderr):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            try:
                self.bar.update(n)
            except OSError:
                self.bar = None
        elif self.enabled and self.every is not None and (now := time.time()) - self.t_last >= self.every:
            self.t_last = now
            say(self.status(now), file=self.out)

    def status(self, now: float | None = None) -> str:
        """'desc: 120/400 it (30%), 12.5 it/s, elapsed 0:09, ETA 0:22'."""
        now = time.time() if now is None else now
        line = f'{self.desc}: {self.n:,}' + (f'/{self.total:,}' if self.total else '') + f' {self.unit}'
        if self.total:
            line += f' ({100 * self.n / self.total:.0f}%)'
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        return line + f', {rate:,.1f} {self.unit}/s, {self.eta(now)}'

    def eta(self, now: float | None = None) -> str:
        """'elapsed 0:09, ETA 0:22' (no ETA before the first unit or after the last)."""
        dt, done = (time.time() if now is None else now) - self.t0, self.n - self.start
        if done <= 0 or not self.total or self.n >= self.total:
            return f'elapsed {fmt_seconds(dt)}'
        return f'elapsed {fmt_seconds(dt)}, ETA {fmt_seconds((self.total - self.n) * dt / done)}'

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            try:
                self.bar.write(line)
                return
            except OSError:
                self.bar = None
        say(line, file=self.out)

    def set_postfix(self, **kw) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def close(self) -> None:
        if self.bar is not None:
            try:
                self.bar.close()
            except OSError:
                pass
            self.bar = None
        elif self.enabled and self.every is not None:
            say(self.status(), file=self.out)
        self.every = None   # closed: write() still prints, nothing else does

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_tty(f) -> bool:
    try:
        return f.isatty()
    except (ValueError, AttributeError):
        return False
