"""Progress bars that show where people look: a bar on a terminal, a line every half minute in a log.

In a log, a job that ends within the first half minute prints no progress line at all (its result
line says enough), so a short command's stderr stays its one line of result or error.
"""

from __future__ import annotations

import io
import sys
from typing import TextIO

from tqdm import tqdm

# In a log (stderr not a terminal): the first progress line after this long, then one at most this often,
# and the last.
LOG_INTERVAL_S = 30.0


class _Lines(io.TextIOBase):
    """What tqdm writes, as whole lines: each refresh (`\\r` + status) becomes one line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, **kwargs: object) -> tqdm:
    """A tqdm bar on stderr: live on a terminal; in a log, one line now and then; nothing when not `enabled`."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, **kwargs)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(sys.stderr),
        mininterval=LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S,
        delay=LOG_INTERVAL_S,
        ncols=100,
        **kwargs,
    )
