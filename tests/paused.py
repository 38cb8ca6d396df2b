"""`surgery` as a real process whose writer pauses inside the copy, so that a test can kill it there, or race
a second run against it (tests/test_faults.py, tests/test_patch.py).

The pause is installed in the child before the CLI runs, by wrapping `OutputFile.copy`: production code
reads no test hook.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Run by `python -c` in the child: argv is [delay, hold file or "", surgery's arguments...].
_CHILD = """
import os, sys, time
from surgery.checkpoints.direct_write import OutputFile
from surgery.cli import main

delay, hold = float(sys.argv[1]), sys.argv[2]
copy = OutputFile.copy

def paused(self, *args, **kwargs):
    copy(self, *args, **kwargs)
    time.sleep(delay)
    while hold and os.path.exists(hold):
        time.sleep(0.01)

OutputFile.copy = paused
main(sys.argv[3:], prog_name="surgery")
"""


def spawn(args: list[str], delay: float = 0, hold: Path | None = None) -> subprocess.Popen:
    """`surgery ARGS` as a real process whose writer, after each copy into an output file, sleeps `delay`
    seconds and waits while the file `hold` exists."""
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(delay), str(hold or ""), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
