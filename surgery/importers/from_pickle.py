"""Convert pickle weights (`pytorch_model*.bin`) into a safetensors checkpoint folder, only when asked to.

Unpickling a file can run any code it names, so nothing else in surgery reads pickle files: every
other command refuses a pickle-only checkpoint and points here. This conversion reads nothing
without `allow_pickle=True` (the CLI's --allow-pickle), and then only through
`torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers and refuses
every other global (a `__reduce__` that calls `exec` or `os.system`, say).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

from surgery.checkpoints.files import INDEX_FILE, SINGLE_FILE, copied_files
from surgery.checkpoints.folder import check_links, index_shards, open_checkpoint
from surgery.checkpoints.staging import check_out, staged_folder
from surgery.errors import SurgeryError, one_line
from surgery.fileio import read_json_object

PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# The one informative line of torch's long weights_only refusal.
_REFUSAL_RE = re.compile(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. Please|\n|$)")


def import_pickle(folder: str | Path, out: str | Path, *, allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Write the pickle weights of `folder` as safetensors, with its other files, to the folder `out`.

    `pytorch_model.bin` becomes `model.safetensors`; shards listed in `pytorch_model.bin.index.json`
    become `model-*.safetensors` with a `model.safetensors.index.json`. Config, tokenizer and the
    other non-weight files are copied. Tensors that share memory (a tied head) are each stored in full.

    Args:
        folder: a local checkpoint folder with pickle weights.
        out: the output folder; must not exist unless `overwrite`.
        allow_pickle: unpickle the weights, with `torch.load(weights_only=True)`. Without it nothing is read.
        overwrite: replace an existing `out`, only once the new one is complete.

    Returns:
        The output folder, resolved.

    Raises:
        SurgeryError: no pickle weights, `allow_pickle` not given, a file `torch.load(weights_only=True)`
            refuses (it holds more than tensors) or cannot read, or a bad `out`. Nothing is written then.
    """
    src = Path(folder)
    if not src.is_dir():
        raise SurgeryError(f"{src}: no such checkpoint folder; check the path")
    src = src.resolve()
    check_links(src)
    shards, index = _pickle_shards(src)
    if not allow_pickle:
        raise SurgeryError(
            f"{src / shards[0]}: reading pickle weights means unpickling them, which can run code; pass "
            "--allow-pickle if you trust the files (they are then loaded with torch.load(weights_only=True))"
        )
    if not (src / "config.json").is_file():
        raise SurgeryError(f"{src}: no config.json; a Hugging Face checkpoint folder needs one")
    out = check_out(Path(out), {"input": src}, overwrite)
    names = {s: _safetensors_name(s, index is not None) for s in shards}
    needed = sum((src / s).stat().st_size for s in shards)
    with staged_folder(out, overwrite, needed) as tmp:
        total = sum(_convert(src / shard, tmp / name) for shard, name in names.items())
        if index is not None:
            weight_map = {t: names[s] for t, s in index["weight_map"].items()}
            obj = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(obj, indent=2) + "\n")
        for rel in [*copied_files(src), *([Path("README.md")] if (src / "README.md").is_file() else [])]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, tmp / rel)
        open_checkpoint(tmp)  # the result validates like any input before it is published
    return out


def _pickle_shards(src: Path) -> tuple[list[str], dict | None]:
    """The pickle files to read (plain names inside `src`), and the index that lists them, if any."""
    if (src / PICKLE_INDEX).is_file():
        index = read_json_object(src / PICKLE_INDEX, "index", "re-download the checkpoint")
        return index_shards(src, index, PICKLE_INDEX), index
    if (src / PICKLE_FILE).is_file():
        return [PICKLE_FILE], None
    raise SurgeryError(f"{src}: no {PICKLE_FILE} or {PICKLE_INDEX}; pass a folder with pickle weights")


def _safetensors_name(shard: str, indexed: bool) -> str:
    if not indexed:
        return SINGLE_FILE
    stem = shard.removesuffix(".bin")
    return ("model" + stem.removeprefix("pytorch_model") if stem.startswith("pytorch_model") else stem) + ".safetensors"


def _convert(path: Path, dest: Path) -> int:
    """Load one pickle file with the restricted unpickler, store its tensors as safetensors; return their bytes."""
    import pickle

    import torch
    from safetensors.torch import save_file

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: one line is the promise
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _REFUSAL_RE.search(str(e))
        why = found.group(1) if found else one_line(e)
        raise SurgeryError(
            f"{path}: refused by torch.load(weights_only=True) ({why}); it is not a plain tensor checkpoint, "
            "and unpickling it without that restriction could run code, so it is not converted"
        ) from None
    except (RuntimeError, ValueError, EOFError, OSError) as e:
        raise SurgeryError(f"{path}: not a readable PyTorch state dict ({one_line(e)}); re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise SurgeryError(f"{path}: not a state dict (names to tensors); pass a model's pytorch_model.bin")
    try:
        save_file(_unshared(state), dest, metadata={"format": "pt"})
    except (ValueError, TypeError) as e:  # a dtype safetensors has no code for (complex, quantized)
        raise SurgeryError(f"{path}: cannot store as safetensors ({one_line(e)})") from None
    return sum(t.numel() * t.element_size() for t in state.values())


def _unshared(state: dict) -> dict:
    """Contiguous tensors that own their memory: safetensors refuses tensors sharing storage (a tied head)."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        shared = ptr in seen and t.numel() > 0
        seen.add(ptr)
        out[name] = t.contiguous().clone() if shared or not t.is_contiguous() else t
    return out
