"""A one-line progress bar on stderr, and a logging handler that prints around it.

No dependency: the bar redraws itself with a carriage return at most ten times a second, and is
silent when the stream is not a terminal (CI, a pipe, a log file) or when disabled; log records
still go out through `ProgressLogHandler`, which clears the bar before a record and redraws it
after.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

_active: list[Progress] = []  # bars currently drawn, innermost last


class Progress:
    """``Progress(total, desc=...)``; call `update` after each step and `close` at the end.

    Also a context manager. ``enabled=None`` draws only when ``stream`` is a terminal.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str = "",
        initial: int = 0,
        enabled: bool | None = None,
        stream: IO[str] | None = None,
        width: int = 24,
        min_interval: float = 0.1,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.total, self.n, self.desc = max(total, 1), initial, desc
        self.width, self.min_interval = width, min_interval
        self.postfix = ""
        self._start_n, self._start = initial, time.monotonic()
        self._last_draw = 0.0
        self._line_len = 0
        if self.enabled:
            _active.append(self)
            self._draw(force=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` steps; keyword values are shown after the bar (``loss=0.123``)."""
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k} {_short(v)}" for k, v in postfix.items())
        self._draw(force=self.n >= self.total)

    def render(self) -> str:
        """The bar as text: ``desc |#####     | 50/100 12.3 it/s eta 0:04 loss 0.1``."""
        frac = min(self.n / self.total, 1.0)
        filled = int(frac * self.width)
        bar = "#" * filled + " " * (self.width - filled)
        elapsed = time.monotonic() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        parts = [self.desc, f"|{bar}|", f"{self.n}/{self.total}", f"{rate:.1f} it/s"]
        parts.append(f"eta {_clock(eta)}")
        if self.postfix:
            parts.append(self.postfix)
        return " ".join(p for p in parts if p)

    def clear(self) -> None:
        """Erase the bar from the current line (before other output is written)."""
        if self.enabled and self._line_len:
            self.stream.write("\r" + " " * self._line_len + "\r")
            self.stream.flush()
            self._line_len = 0

    def redraw(self) -> None:
        self._draw(force=True)

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            if self in _active:
                _active.remove(self)
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        text = self.render()
        pad = max(self._line_len - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._line_len = len(text)


class ProgressLogHandler(logging.StreamHandler):
    """A stream handler that clears any active bar before a record and redraws it after. Without a
    stream it writes to whatever ``sys.stderr`` is when a record comes (not the stream of the moment
    it was made), so a handler set up once keeps working when stderr is replaced, e.g. by a test's
    capture."""

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self._fixed = stream  # StreamHandler put sys.stderr of this moment there

    @property
    def stream(self):  # noqa: D102
        return sys.stderr if self._fixed is None else self._fixed

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it (None: stderr, read anew)
        self._fixed = value

    def emit(self, record: logging.LogRecord) -> None:
        for bar in _active:
            bar.clear()
        super().emit(record)
        for bar in _active:
            bar.redraw()


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or unknown
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def setup_logging(quiet: bool) -> None:
    """Send the ``poslab`` log to stderr through a `ProgressLogHandler` (INFO, or WARNING when
    ``quiet``); the command line and each grid worker process call it once."""
    log = logging.getLogger("poslab")
    handler = ProgressLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers = [h for h in log.handlers if not isinstance(h, ProgressLogHandler)]
    # The handler's own level too: a run's train.log lowers the logger's level to INFO while it
    # writes, and -q must still keep those lines off the terminal.
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
