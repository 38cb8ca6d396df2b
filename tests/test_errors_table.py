"""docs/errors.md, run: every row's command must give exactly its message, exit code 2, and write nothing.

The table is the test's data, so the doc and the code cannot drift apart. Each row names an input
(a key of SETUPS below, which builds it in a scratch folder `{w}` holding copies of the conftest
pair as `{w}/source` and `{w}/target`), a command line and the message, where `{w}` stands for the
folder and `{pid}` for this process's id.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from surgery.checkpoints.staging import output_lock
from surgery.transplants.patch import write_patch
from tests.helpers import BROKEN, make_model, refused, write_manifest

DOC = Path(__file__).parent.parent / "docs" / "errors.md"
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{12}…")
COMMANDS = {
    "inspect", "compat", "transplant", "verify", "profile", "manifest", "analyze",
    "eval", "report", "sweep", "select", "solutions", "push", "import-gguf", "import-pickle", "apply",
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    command: str
    input: str
    args: str
    message: str


def parse_rows(text: str) -> list[Row]:
    """The rows of the table: `| command | input | `` surgery ARGS `` | `` MESSAGE `` |`."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 4 or cells[0] in ("Command", "---") or set(cells[0]) <= {"-"}:
            continue
        args, message = (_code(c) for c in cells[2:])
        rows.append(Row(cells[0], cells[1], args.removeprefix("surgery "), message))
    return rows


def _code(cell: str) -> str:
    assert cell.startswith("`` ") and cell.endswith(" ``"), f"not a ``code`` cell: {cell}"
    return cell[3:-3].replace("\\|", "|")


def _manifest(w: Path) -> Path:
    return write_manifest(w / "m.json", w / "source", w / "target")


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        obj = json.loads(_manifest(w).read_text())
        change(obj)
        (w / "m.json").write_text(json.dumps(obj))

    return apply


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        path = w / "target" / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))

    return apply


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (w / name).write_bytes(data)

    return apply


def _on_target(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda w: damage(w / "target")


def _symlink_out(w: Path) -> None:
    (w / "secret.txt").write_text("not yours")
    (w / "target" / "tokenizer.json").symlink_to(w / "secret.txt")


def _qwen(w: Path) -> None:
    make_model(w / "qwen", 1, arch="qwen2")


def _gguf_garbage(w: Path) -> None:
    (w / "model.gguf").write_bytes(struct.pack("<4sI", b"NOPE", 3) + bytes(64))


def _patch(target: str = "target", source: str = "source") -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        write_patch(target=w / target, source=w / source, out=w / "p", modules=["model.layers.1.mlp.*"], progress=False)

    return apply


def _damaged_patch(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        _patch()(w)
        damage(w / "p")

    return apply


def _target_summary(w: Path) -> None:
    """An eval summary of the target itself, to be refused in a transplant output's card."""
    from surgery import open_checkpoint

    summary = {
        "benchmark": "gsm8k",
        "problems": 10,
        "correct": 2,
        "accuracy": 0.2,
        "accuracy_ci95": [0.05, 0.5],
        "settings": {"model_fingerprint": open_checkpoint(w / "target").fingerprint},
    }
    (w / "t.json").write_text(json.dumps(summary))


def _flip_last_byte(patch: Path) -> None:
    data = bytearray((patch / "patch.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (patch / "patch.safetensors").write_bytes(bytes(data))


# Held for the whole row by the `held_lock` fixture: a second writer of {w}/out must be refused.
LOCKED = "another run writing the output"

SETUPS: dict[str, Callable[[Path], None]] = {
    **{key: _on_target(damage) for key, (damage, _) in BROKEN.items()},
    "bad arguments": lambda w: None,
    "bad arguments, valid manifest": _manifest,
    "no config.json": lambda w: (w / "target" / "config.json").unlink(),
    "custom model code": _edit_config(lambda c: c.update(auto_map={"AutoConfig": "x.Config"})),
    "a workload without solutions": _write("w.jsonl", '{"prompt": "hi"}\n'),
    "valid manifest, a workload without solutions": lambda w: (
        _manifest(w),
        _write("w.jsonl", '{"prompt": "hi"}\n')(w),
    ),
    "config claims 200000 layers": _edit_config(lambda c: c.update(num_hidden_layers=200000)),
    "config claims hidden_size 48": _edit_config(lambda c: c.update(hidden_size=48)),
    "symlink out of the folder": _symlink_out,
    "a qwen2 source": _qwen,
    "output exists": lambda w: (w / "out").mkdir(),
    "manifest for other checkpoints": _edit_manifest(lambda m: m["target"].update(fingerprint="sha256:" + "1" * 64)),
    "manifest names an embedding": _edit_manifest(lambda m: m["modules"][0].update(name="model.embed_tokens")),
    "manifest lists other tensors": _edit_manifest(lambda m: m["modules"][0].update(tensors=["model.norm.weight"])),
    "manifest of another schema": _edit_manifest(lambda m: m.update(schema_version=7)),
    LOCKED: lambda w: None,
    "empty workload": _write("w.jsonl", ""),
    "workload line not JSON": _write("w.jsonl", "{bad\n"),
    "stats file that is not stats": _write("junk.safetensors", bytes(16)),
    "benchmark without answers": _write("b.jsonl", '{"question": "1+1?"}\n'),
    "not a GGUF file": _gguf_garbage,
    "a patch": _patch(),
    "an eval summary of the target": _target_summary,
    "a patch made for another target": _patch("source", "target"),
    "a patch and a qwen2 model": lambda w: (_patch()(w), _qwen(w)),
    "a patch missing its tensors file": _damaged_patch(lambda p: (p / "patch.safetensors").unlink()),
    "a patch whose tensor bytes changed": _damaged_patch(_flip_last_byte),
    "a patch and its target with another config": lambda w: (
        _patch()(w),
        _edit_config(lambda c: c.update(max_position_embeddings=4096))(w),
    ),
    "a reversible patch missing its originals": lambda w: (
        write_patch(
            target=w / "target",
            source=w / "source",
            out=w / "p",
            modules=["model.layers.1.mlp.*"],
            reversible=True,
            progress=False,
        ),
        (w / "p" / "original.safetensors").unlink(),
    ),
}


ROWS = parse_rows(DOC.read_text(encoding="utf-8"))


@pytest.fixture
def held_lock(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """For the LOCKED row: this process holds {w}/out's lock while the command runs."""
    (tmp_path / "w").mkdir()
    if request.node.callspec.params["row"].input != LOCKED:
        yield
        return
    with output_lock(tmp_path / "w" / "out"):
        yield


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.command}: {r.input}" for r in ROWS])
def test_row(tmp_path: Path, sharded_pair: tuple[Path, Path], row: Row, held_lock: None) -> None:
    w = tmp_path / "w"
    shutil.copytree(sharded_pair[0], w / "source")
    shutil.copytree(sharded_pair[1], w / "target")
    SETUPS[row.input](w)
    args = shlex.split(row.args.replace("{w}", str(w)))
    assert args[0] == row.command, f"the row is filed under {row.command} but runs {args[0]}"
    result = refused(args, "", watch=w)
    got = result.stderr.removeprefix("error: ").removesuffix("\n").replace(str(w), "{w}")
    # A fingerprint covers config.json, which records the transformers version that saved the test models: the
    # table shows one machine's, and any 12 hex digits stand in for it here.
    got, want = (FINGERPRINT.sub("sha256:…", m) for m in (got, row.message.replace("{pid}", str(os.getpid()))))
    assert got == want, "docs/errors.md differs from the command"


def test_table_covers_every_command_and_setup() -> None:
    assert len(ROWS) >= 30
    assert {r.command for r in ROWS} == COMMANDS
    assert {r.input for r in ROWS} == set(SETUPS), "a setup no row uses, or a row with no setup"
    assert len({(r.args, r.input) for r in ROWS}) == len(ROWS), "a row appears twice"
