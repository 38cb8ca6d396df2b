"""The README's examples, run in order as a user would paste them, on the tiny pair of `tests/tiny_pair.py`.

Every ```bash and ```python block runs, and every `$ ` command line of a ```console block (the
lines after it are its printed output). A block that cannot run here says why on the line above its
fence, `<!-- not run by tests/test_readme.py: REASON -->`, with REASON one of SKIP_REASONS. The
blocks share one scratch folder, which holds `.venv` and `tests` (links to this checkout) as a
fresh clone after `make venv` does, so each example sees what the ones before it wrote.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
MARK = "not run by tests/test_readme.py: "
SKIP_REASONS = {
    "the set-up itself",
    "needs the Hugging Face Hub",
    "needs make demo's models",
    "needs a GGUF file",
    "needs a pickle checkpoint",
}
FENCE = re.compile(r"^(?:<!-- (?P<mark>[^\n]*) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)^```$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    skip: str | None


def readme_blocks(text: str) -> list[Block]:
    """The ```bash, ```console and ```python blocks of the README, in order."""
    blocks = []
    for m in FENCE.finditer(text):
        if m["lang"] not in ("bash", "console", "python"):
            continue
        skip = m["mark"].removeprefix(MARK) if m["mark"] else None
        code = _commands(m["body"]) if m["lang"] == "console" else m["body"]
        blocks.append(Block(text[: m.start()].count("\n") + 1 + bool(m["mark"]), m["lang"], code, skip))
    return blocks


def _commands(transcript: str) -> str:
    """The `$ ` lines of a console transcript (with their `\\` continuations), without the output."""
    commands, continued = [], False
    for line in transcript.splitlines():
        if line.startswith("$ ") or continued:
            commands.append(line.removeprefix("$ "))
            continued = line.endswith("\\")
    return "\n".join(commands) + "\n"


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_every_skipped_block_says_why() -> None:
    assert len(BLOCKS) >= 15
    for block in BLOCKS:
        assert block.skip is None or block.skip in SKIP_REASONS, f"README line {block.line}: {block.skip!r}"
    assert sum(b.skip is None for b in BLOCKS) >= 12, "most examples must run"


@pytest.mark.slow
def test_the_readme_examples_run_as_pasted(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(tmp_path),
    }
    for block in BLOCKS:
        if block.skip is not None:
            continue
        cmd = [sys.executable, "-c", block.code] if block.lang == "python" else ["bash", "-euo", "pipefail", "-c"]
        if block.lang != "python":
            cmd.append(block.code)
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (
            f"README line {block.line} ({block.lang}) failed with exit {run.returncode}:\n{block.code}\n"
            f"--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$ surgery inspect x\npath  /x\n", "surgery inspect x\n"),
        (
            "$ surgery report -s a \\\n    -p b\nout\n$ surgery verify o\nok\n",
            "surgery report -s a \\\n    -p b\nsurgery verify o\n",
        ),
    ],
)
def test_console_blocks_run_only_their_commands(text: str, expected: str) -> None:
    assert _commands(text) == expected
