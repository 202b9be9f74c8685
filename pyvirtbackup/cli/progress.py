"""Progress of a running backup for a person: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from typing import Any, TextIO

MiB = 1024 * 1024


def _hms(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Renders job stats; ``tty`` picks the in-place bar over one line per update."""

    def __init__(self, out: TextIO, tty: bool, width: int = 30, line_every: float = 5.0) -> None:
        self.out = out
        self.tty = tty
        self.width = width
        self.line_every = line_every
        self._last_line = 0.0
        self._samples: list[tuple[float, int]] = []

    def rate(self, now: float, processed: int) -> float:
        """Bytes per second over the last few seconds of samples."""
        self._samples.append((now, processed))
        self._samples = [s for s in self._samples if now - s[0] <= 5.0]
        t0, p0 = self._samples[0]
        return (processed - p0) / (now - t0) if now > t0 else 0.0

    def text(self, stats: dict[str, Any], now: float) -> str:
        if "disk_total" in stats:
            total, done = stats["disk_total"], stats["disk_processed"]
            rate = self.rate(now, done)
            if rate <= 0 and stats.get("time_elapsed"):  # one sample so far: since the start
                rate = done / (stats["time_elapsed"] / 1000)
            pct = 100.0 * done / total if total else 0.0
            eta = _hms((total - done) / rate) if rate > 0 else "-:--:--"
            filled = int(self.width * pct / 100)
            bar = "#" * filled + "-" * (self.width - filled)
            return (
                f"[{bar}] {pct:5.1f}% {done / MiB:,.1f}/{total / MiB:,.1f} MiB "
                f"{rate / MiB:,.1f} MiB/s ETA {eta}"
            )
        used = stats.get("disk_temp_used", 0)
        total = stats.get("disk_temp_total", 0)
        elapsed = _hms(stats.get("time_elapsed", 0) / 1000)
        return (
            f"pull backup running {elapsed}: scratch holds {used / MiB:,.1f} MiB of "
            f"{total / MiB:,.1f} MiB copied before guest writes; end it with domjobabort"
        )

    def update(self, stats: dict[str, Any]) -> None:
        now = time.monotonic()
        line = self.text(stats, now)
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
        elif now - self._last_line >= self.line_every:
            self._last_line = now
            self.out.write(line + "\n")
            self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()
