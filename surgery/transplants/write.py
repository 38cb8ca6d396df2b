"""Plan and write a patched checkpoint: the target's tensors, selected modules from the source.

The output's tensor names, dtypes, shapes and offsets equal the target's, so every
output header is known before a byte is written. Each output file is written front to back,
in the kernel (`copy_file_range`) or through a few 8 MiB blocks (with O_DIRECT, for an output too
large to stay in the page cache: `direct_write`), so peak memory does not grow with the
checkpoint. The output is built in a temp folder beside OUT, fsynced and renamed into place.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoints.candidates import Candidate, Compatibility, find_candidates
from surgery.checkpoints.digests import tensor_digests
from surgery.checkpoints.direct_write import BlockWriter, wants_direct
from surgery.checkpoints.files import CARD_FILE, INDEX_FILE, RECORD_FILE, copied_files
from surgery.checkpoints.folder import Checkpoint, TensorRef, open_checkpoint
from surgery.checkpoints.header import ShardHeader, encode_header
from surgery.checkpoints.staging import TMP_PREFIX, check_out, staged_folder
from surgery.checkpoints.streaming import ReadOnlyFiles, cast_reader, check_convertible, converted_chunks
from surgery.errors import SurgeryError
from surgery.fileio import read_json_object
from surgery.manifest import (
    Manifest,
    ModuleEntry,
    Selection,
    check_ranked_for,
    file_sha256,
    load_manifest,
    ranked_elsewhere,
    select_modules,
)
from surgery.progress import progress_bar
from surgery.transplants.summaries import foreign_summaries, load_eval_summary
from surgery.version import __version__

# Test hooks, not an API: after each piece is written, sleep this many seconds, and wait while the
# file the second one names exists, so that the fault tests (tests/test_faults.py) can kill a run,
# or start a second one, while it is inside the copy.
PIECE_DELAY_ENV = "SURGERY_TEST_PIECE_DELAY"
HOLD_ENV = "SURGERY_TEST_HOLD_FILE"
# Copies go in steps of this size; after each, the progress bar moves, writeback starts (through the
# page cache) and `write_shards`' `poll` runs.
STEP_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Piece:
    """A run of output bytes taken from one input file at one offset (absolute offsets).

    `tensor` names a tensor taken from the source: those are hashed on the way (and cast if
    needed); target runs are copied as they are.
    """

    src_path: Path
    src_off: int
    src_nbytes: int
    dst_off: int
    nbytes: int
    src_dtype: str
    dst_dtype: str
    tensor: str | None = None


@dataclass(frozen=True)
class ShardPlan:
    name: str
    header: bytes
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class TransplantResult:
    """What `transplant` wrote.

    Attributes:
        out: the output folder.
        modules: the transplanted module names, in selection order.
        tensors: tensor name -> sha256 of its bytes in the output, for tensors from the source.
        source_bytes: the output bytes of those tensors.
        total_bytes: the output's tensor bytes in all.
        linked_shards: the shards hard-linked to the target's files (`link`), by name.
        shards: the output's shard count.
    """

    out: Path
    modules: tuple[str, ...]
    tensors: dict[str, str]
    source_bytes: int
    total_bytes: int
    linked_shards: tuple[str, ...] = ()
    shards: int = 0

    @classmethod
    def made(cls, out: Path, modules: Sequence[str], written: Written, tgt: Checkpoint) -> TransplantResult:
        """The result of writing `tgt` with the tensors in `written.hashes` replaced."""
        source_bytes = sum(tgt.tensors[n].info.nbytes for n in written.hashes)
        return cls(out, tuple(modules), written.hashes, source_bytes, tgt.total_bytes, written.linked, len(tgt.shards))


@dataclass(frozen=True)
class Written:
    """What `write_checkpoint` wrote: each replaced tensor's sha256 as written, and the shards it hard-linked."""

    hashes: dict[str, str]
    linked: tuple[str, ...]


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes lie: a file, the absolute offset, the byte count and the dtype."""

    path: Path
    offset: int
    nbytes: int
    dtype: str


def stored(ref: TensorRef) -> Stored:
    """Where a checkpoint's tensor lies."""
    return Stored(ref.shard.path, ref.shard.data_start + ref.info.begin, ref.info.nbytes, ref.info.dtype)


@dataclass(frozen=True)
class Selected:
    """What a transplant (or a patch) takes from the source, known before a byte is written.

    Attributes:
        target, source: the opened, config-checked inputs.
        manifest: the manifest the modules were chosen from, if any.
        modules: the selected modules, in selection order.
        provenance: tool, source, target and manifest, as recorded in `transplant.json` and every shard header.
        selection: the selection options, as recorded.
    """

    target: Checkpoint
    source: Checkpoint
    manifest: Manifest | None
    modules: list[Candidate | ModuleEntry]
    provenance: dict
    selection: dict
    manifest_path: Path | None = None

    @property
    def tensors(self) -> list[str]:
        """The selected modules' tensors, sorted by name."""
        return sorted(t for c in self.modules for t in c.tensors)

    def shard_header(self, shard: ShardHeader) -> bytes:
        return provenance_header(self.provenance, shard)

    def card(self, name: str, **extra: Any):
        """The model card of the checkpoint this selection makes (`card.model_card`; `extra`: its options)."""
        from surgery.transplants import card as cards

        manifest_file = self.manifest_path.name if self.manifest_path is not None else None
        return cards.model_card(
            name,
            self.target,
            self.source,
            self.modules,
            manifest=self.manifest,
            selection=self.selection,
            manifest_file=manifest_file,
            **extra,
        )


def output_fingerprint(tgt: Checkpoint, src: Checkpoint, tensors: Sequence[str]) -> str:
    """The fingerprint of the checkpoint `transplant` writes with `tensors` from `src`, without writing it.

    What an in-memory evaluation of that model (`sweep`) records, so that its summary can go into the
    card of the checkpoint written later.
    """
    where = {n: stored(src.tensors[n]) for n in tensors}
    return tgt.fingerprint_with(
        {n: cast_reader(w.path, w.offset, w.dtype, tgt.tensors[n].info.dtype) for n, w in where.items()}
    )


def provenance_header(provenance: dict, shard: ShardHeader) -> bytes:
    """An output shard's header: the target's tensors and metadata, plus `format: pt` and the provenance."""
    metadata = {**shard.metadata, "format": "pt", "surgery.provenance": json.dumps(provenance, sort_keys=True)}
    return encode_header(list(shard.tensors), metadata)


def select(
    target: str | Path,
    source: str | Path,
    *,
    manifest: str | Path | None = None,
    top_k: int | None = None,
    only: str | None = None,
    layers: tuple[int, int] | None = None,
    modules: Sequence[str] = (),
    force: bool = False,
    trust_remote_code: bool = False,
    out: Path | None = None,
    overwrite: bool = False,
) -> Selected:
    """Open and check the inputs and apply the selection options (see `transplant` for their meaning).

    `out`, when given, is checked (it must not exist unless `overwrite`, nor be an input) before the
    manifest is read. Raises SurgeryError on any invalid input.
    """
    tgt, src = open_checkpoint(target), open_checkpoint(source)
    # A config that disagrees with the tensors would be copied into an output `from_pretrained` cannot load.
    tgt.check_config()
    src.check_config()
    if out is not None:
        check_out(out, {"target": tgt.path, "source": src.path}, overwrite)
    man = load_manifest(manifest) if manifest is not None else None
    matches = man is not None and ranked_elsewhere(man, src, tgt) is None
    # The K that `surgery select` chose on held-out problems, when neither --top-k nor --module says otherwise.
    chosen_k = man.selection if man is not None and top_k is None and not modules else None
    if chosen_k is not None:
        _check_selected_k(chosen_k, only, layers, force and not matches)
    if man is not None and not matches:
        check_ranked_for(man, src, tgt, force)
    k_from = None  # set when K comes from the manifest, not from --top-k
    if chosen_k is not None:
        # Said here, in the record and in the card.
        top_k, k_from = chosen_k.k, f"chosen by surgery select: {chosen_k.rule}"
        print(f"top-k {top_k} from the manifest's selection ({chosen_k.rule})", file=sys.stderr)
    # A manifest ranked on these exact checkpoints (the fingerprints cover the config and every tensor's
    # name, dtype and shape) has a candidate list that stands in for rebuilding the model on the meta
    # device. That keeps torch and transformers out of this process: they cost ~340 MiB RSS and seconds
    # of start-up for a job that only moves bytes.
    compat = None if matches else find_candidates(src, tgt, trust_remote_code)
    chosen = _select(man, compat, src, tgt, top_k, only, layers, modules)
    tensors = sorted(t for c in chosen for t in c.tensors)
    for name in tensors:
        check_convertible(src.tensors[name].info.dtype, tgt.tensors[name].info.dtype, f"tensor {name}")
    for line in warnings(src, tgt, tensors):
        print(line, file=sys.stderr)
    provenance = {
        "tool": f"surgery {__version__}",
        "source": _origin(src),
        "target": _origin(tgt),
        "manifest": None
        if man is None
        else {"path": str(manifest), "sha256": file_sha256(manifest), "method": man.method.name},
    }
    selection = {
        "top_k": top_k,
        **({"top_k_from": k_from} if k_from else {}),
        "only": only,
        "layers": list(layers) if layers else None,
        "patterns": list(modules),
    }
    return Selected(tgt, src, man, chosen, provenance, selection, Path(manifest) if manifest is not None else None)


def transplant(
    target: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    manifest: str | Path | None = None,
    top_k: int | None = None,
    only: str | None = None,
    layers: tuple[int, int] | None = None,
    modules: Sequence[str] = (),
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    eval_results: Sequence[str | Path] = (),
    link: bool = False,
) -> TransplantResult:
    """Write a copy of `target` with the selected modules' tensors taken from `source`.

    Select with a manifest (`manifest` + `top_k`, optionally `only`/`layers`/`modules`
    as filters) or by name alone (`modules` glob patterns over the candidates). The output
    gets a model card (`README.md`, see `surgery.transplants.card.model_card`).

    Args:
        target: the checkpoint folder to patch (never modified), or a Hub repo id `org/name[@revision]`.
        source: the checkpoint folder modules are taken from (never modified), or a Hub repo id.
        out: the output folder; must not exist unless `overwrite`.
        manifest: a module manifest ranking the candidates.
        top_k: transplant the K best-ranked modules left after filtering. None, with a manifest that holds a
            K chosen by `surgery select` and no `modules`, takes that K; it is refused with `only`, `layers` or
            a manifest of other checkpoints (`force`), since select measured the top K of all modules on its pair.
        only: restrict to one kind: `attn`, `mlp` or `other`.
        layers: restrict to an inclusive layer range.
        modules: module names or glob patterns.
        force: accept a manifest whose fingerprints do not match, or eval results of another model (with a
            warning, and a note in the card).
        overwrite: replace an existing `out`, only once the new output is complete.
        progress: show a progress bar of bytes (only when stderr is a terminal).
        trust_remote_code: allow configs that need custom model code.
        eval_results: `summary.json` files written by `surgery eval`, reported in the model card.
        link: hard-link the target's shards that hold no selected tensor instead of copying them (their
            bytes and headers stay the target's; across filesystems they are copied, with a note).

    Returns:
        What was written.

    Raises:
        SurgeryError: any input is invalid; nothing is written in that case.
    """
    out = Path(out)
    sel = select(
        target,
        source,
        manifest=manifest,
        top_k=top_k,
        only=only,
        layers=layers,
        modules=modules,
        force=force,
        trust_remote_code=trust_remote_code,
        out=out,
        overwrite=overwrite,
    )
    out = out.resolve()
    summaries = [load_eval_summary(p) for p in eval_results]
    tgt, src = sel.target, sel.source
    # The output's fingerprint is read only when there are summaries to check against it: for a cast
    # selection it imports torch, which a plain transplant never needs.
    expected = output_fingerprint(tgt, src, sel.tensors) if summaries else ""
    notes = foreign_summaries(eval_results, summaries, expected, force)
    replacements = {name: stored(src.tensors[name]) for name in sel.tensors}
    record = {**sel.provenance, "selection": sel.selection, "modules": [c.name for c in sel.modules]}

    def card() -> str:
        return sel.card(out.name, eval_summaries=summaries, notes=notes).content

    written = write_checkpoint(out, tgt, replacements, sel.shard_header, record, card, overwrite, link, progress)
    return TransplantResult.made(out, [c.name for c in sel.modules], written, tgt)


def write_checkpoint(
    out: Path,
    tgt: Checkpoint,
    replacements: dict[str, Stored],
    shard_header: Callable[[ShardHeader], bytes],
    record: dict | None,
    card: str | Callable[[], str] | None,
    overwrite: bool,
    link: bool,
    progress: bool,
    *,
    index_text: str | None = None,
    source_dtypes: dict[str, str] | None = None,
    link_same_header: bool = False,
    poll: Callable[[], None] | None = None,
    check: Callable[[dict[str, str]], None] | None = None,
) -> Written:
    """Write `tgt` with the `replacements` tensors (cast to the target's dtypes) into `out`, atomically.

    Every shard gets the header `shard_header` makes (its tensors' offsets must be the target's); the
    target's other files are copied, the index is written (`index_text` as is, else the target's
    index), `card` becomes README.md and `record` (with the copied tensors and their sha256 added)
    becomes transplant.json, where `source_dtypes` (default: the replacements' dtypes) gives each
    tensor's dtype in the source. `card` may be a function that makes the text: it is called on a
    second thread while the shards are written (building a card imports huggingface_hub, ~0.25 s).
    With `link`, shards holding no replaced tensor are hard-linked from the target; with
    `link_same_header` too, only those whose header is already the one to write. Their tensors' sha256
    go into the record as `linked_sha256` (hashed beside the write), so that `verify` can tell an
    edit of the target in place, which changes the output too, and one warning says so. `poll`, if given, is
    called between copy steps (a check running beside the write: an error it raises stops it), and
    `check` with the replaced tensors' sha256 as written, before the output is published; either
    one's error discards the output.
    Returns each replaced tensor's sha256 as written, and the linked shards.
    """
    plans = _plan(tgt, replacements, shard_header)
    with (
        staged_folder(out, overwrite, sum(len(p.header) + sum(x.nbytes for x in p.pieces) for p in plans)) as tmp,
        ThreadPoolExecutor(2, thread_name_prefix="surgery-card") as pool,
    ):
        card_text = pool.submit(card) if callable(card) else None
        linked = _link_untouched(tmp, plans, tgt, link_same_header) if link else set()
        if linked:
            print(
                f"warning: {len(linked)} of {len(plans)} shards are hard links to the target's files: editing the "
                f"target in place changes this output too (`surgery verify` finds such an edit)",
                file=sys.stderr,
            )
        in_linked = [t.name for s in tgt.shards if s.path.name in linked for t in s.tensors]
        linked_digests = pool.submit(tensor_digests, tgt, in_linked) if linked and record is not None else None
        hashes = write_shards(tmp, [p for p in plans if p.name not in linked], progress, poll, read_next=True)
        if check is not None:
            check(hashes)
        _copy_extra_files(tgt.path, tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card if card_text is None else card_text.result(), encoding="utf-8")
        if index_text is not None:
            (tmp / INDEX_FILE).write_text(index_text, encoding="utf-8")
        elif tgt.index is not None:
            _write_json(tmp / INDEX_FILE, tgt.index)
        if record is not None:
            tensors = [
                {
                    "name": name,
                    "dtype": tgt.tensors[name].info.dtype,
                    "source_dtype": (source_dtypes or {}).get(name, replacements[name].dtype),
                    "sha256": hashes[name],
                }
                for name in sorted(hashes)
            ]
            if link:
                record = {
                    **record,
                    "linked_shards": sorted(linked),
                    "linked_sha256": dict(sorted(linked_digests.result().items())) if linked_digests else {},
                }
            _write_json(tmp / RECORD_FILE, {**record, "tensors": tensors})
    return Written(hashes, tuple(sorted(linked)))


# Config keys that say how a checkpoint was saved, not what the model is.
_COSMETIC_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def warnings(src: Checkpoint, tgt: Checkpoint, tensors: list[str]) -> list[str]:
    """What a user would want to hear before a transplant that is allowed but suspicious.

    The same checkpoint on both sides (the output equals the target), configs that differ beyond how
    they were saved (the models may be unrelated), and tensors cast from the source's dtype.
    """
    lines = []
    if src.fingerprint == tgt.fingerprint:
        lines.append(
            f"warning: source and target are the same checkpoint ({tgt.fingerprint[:19]}…): the output will equal "
            "the target"
        )
    keys = sorted(k for k in src.config.keys() | tgt.config.keys() if k not in _COSMETIC_KEYS)
    differ = [k for k in keys if src.config.get(k) != tgt.config.get(k)]
    if differ:
        shown = ", ".join(f"{k} ({src.config.get(k)!r} vs {tgt.config.get(k)!r})" for k in differ[:5])
        more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
        lines.append(f"warning: the configs differ (source vs target): {shown}{more}; are these models related?")
    casts: dict[tuple[str, str], int] = {}
    for name in tensors:
        pair = (src.tensors[name].info.dtype, tgt.tensors[name].info.dtype)
        if pair[0] != pair[1]:
            casts[pair] = casts.get(pair, 0) + 1
    for (frm, to), n in sorted(casts.items()):
        lines.append(f"note: {n} tensor{'s' if n != 1 else ''} cast from the source's {frm} to the target's {to}")
    return lines


def _origin(ckpt: Checkpoint) -> dict:
    """How the record names an input; a Hub snapshot also gets its repo and commit (its path is a cache path)."""
    origin: dict = {"path": str(ckpt.path), "fingerprint": ckpt.fingerprint}
    if ckpt.hub is not None:
        origin["hub"] = {"repo_id": ckpt.hub.repo_id, "revision": ckpt.hub.revision, "commit": ckpt.hub.commit}
    return origin


def check_output(folder: Path) -> dict:
    """Refuse anything but a complete, published transplant output (e.g. before pushing it).

    Args:
        folder: the folder to check.

    Returns:
        Its `transplant.json` record.

    Raises:
        SurgeryError: not a folder, an unfinished temp folder, no record, or shards that do not validate.
    """
    if not folder.is_dir():
        raise SurgeryError(f"{folder}: no such folder; pass the output folder of `surgery transplant`")
    if folder.resolve().name.startswith(TMP_PREFIX):
        raise SurgeryError(f"{folder}: an unfinished transplant (temp folder); pass the published output folder")
    if not (folder / RECORD_FILE).is_file():
        raise SurgeryError(f"{folder}: no {RECORD_FILE}, so not a complete `surgery transplant` output; rerun it")
    record = read_json_object(folder / RECORD_FILE, "transplant record", "rerun `surgery transplant`")
    open_checkpoint(folder.resolve())  # every shard present, every header valid
    return record


def _select(
    man: Manifest | None,
    compat: Compatibility | None,
    src: Checkpoint,
    tgt: Checkpoint,
    top_k: int | None,
    only: str | None,
    layers: tuple[int, int] | None,
    patterns: Sequence[str],
) -> list[Candidate | ModuleEntry]:
    """Apply the selection options; check every chosen module against the checkpoints.

    `compat` is None when a manifest with matching fingerprints stands in for it.
    """
    if compat is not None:
        names = [c.name for c in compat.candidates]
        reasons = {e.name: e.reason for e in compat.excluded}
    else:
        assert man is not None
        names = [m.name for m in man.modules]
        reasons = dict(man.excluded)
    for p in patterns:
        # A pattern that names only excluded modules deserves the exclusion reason, not "matches nothing".
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            hit = next((n for n in reasons if fnmatch.fnmatchcase(n, p)), None)
            if hit is not None:
                raise SurgeryError(f"--module {p!r} names {hit}, which is not transplantable: {reasons[hit]}")
    if man is None:
        assert compat is not None
        if top_k is not None:
            raise SurgeryError("--top-k ranks modules and needs --manifest; or name modules with --module")
        if not patterns:
            raise SurgeryError("nothing selected: pass --manifest M --top-k K, or --module PATTERN")
        return select_modules(compat.candidates, only=only, layers=layers, patterns=patterns)
    if top_k is None and not patterns:
        raise SurgeryError(
            "a manifest needs --top-k K (or --module PATTERN) to say how many modules to transplant, "
            "or a K chosen by `surgery select`"
        )
    entries = select_modules(man.modules, top_k=top_k, only=only, layers=layers, patterns=patterns)
    by_name = {c.name: c for c in compat.candidates} if compat is not None else {}
    for e in entries:
        if e.name in reasons or (compat is not None and e.name not in by_name):
            why = reasons.get(e.name, "no such module in these checkpoints")
            raise SurgeryError(f"manifest module {e.name!r} is not transplantable ({why}); regenerate the manifest")
        have = by_name[e.name] if compat is not None else _module_in_headers(e, src, tgt)
        if have.tensors != e.tensors or have.shape != e.shape:
            raise SurgeryError(
                f"manifest module {e.name!r} lists tensors {list(e.tensors)} of shape {list(e.shape)}, but the "
                f"checkpoints have {list(have.tensors)} of shape {list(have.shape)}; regenerate the manifest"
            )
    return entries


def _module_in_headers(e: ModuleEntry, src: Checkpoint, tgt: Checkpoint) -> Candidate:
    """What the checkpoints' headers hold for a manifest module: its weight (and bias), equal in both."""
    tensors = tuple(t for t in (f"{e.name}.weight", f"{e.name}.bias") if t in tgt.tensors)
    weight = tgt.tensors.get(f"{e.name}.weight")
    for t in tensors:
        if t not in src.tensors or src.tensors[t].info.shape != tgt.tensors[t].info.shape:
            raise SurgeryError(
                f"manifest module {e.name!r}: tensor {t} is missing from the source or differs in shape; "
                "regenerate the manifest"
            )
    if weight is None or len(weight.info.shape) != 2:
        raise SurgeryError(f"manifest module {e.name!r} has no 2-D weight in the target; it is not an nn.Linear")
    return Candidate(e.name, e.kind, e.layer, tensors, weight.info.shape)


def _check_selected_k(selection: Selection, only: str | None, layers: tuple[int, int] | None, foreign: bool) -> None:
    """Refuse the K `surgery select` chose where it was not measured.

    It measured the top K of all the manifest's modules (select has no filters) on the checkpoints the
    manifest was made for: `--only` and `--layers` change which modules K counts, and `foreign` (a manifest
    used with --force) means other checkpoints.
    """
    filters = [f for f in (only and f"--only {only}", layers and f"--layers {layers[0]}-{layers[1]}") if f]
    if filters:
        raise SurgeryError(
            f"the manifest's K={selection.k} was chosen by `surgery select` for the top {selection.k} of all its "
            f"modules, not with {' and '.join(filters)}; pass --top-k K for this selection"
        )
    if foreign:
        raise SurgeryError(
            f"the manifest's K={selection.k} was measured by `surgery select` on the checkpoints it was made for, "
            "not these; pass --top-k K to use it with --force"
        )


def _plan(
    tgt: Checkpoint, replacements: dict[str, Stored], shard_header: Callable[[ShardHeader], bytes]
) -> list[ShardPlan]:
    """Compute every output header and every byte's origin."""
    plans = []
    for shard in tgt.shards:
        header = shard_header(shard)
        pieces = []
        for info in shard.tensors:
            dst_off = len(header) + info.begin
            if info.name in replacements:
                r = replacements[info.name]
                piece = Piece(r.path, r.offset, r.nbytes, dst_off, info.nbytes, r.dtype, info.dtype, tensor=info.name)
            else:
                start = shard.data_start + info.begin
                piece = Piece(shard.path, start, info.nbytes, dst_off, info.nbytes, info.dtype, info.dtype)
            pieces.append(piece)
        plans.append(ShardPlan(shard.path.name, header, tuple(_coalesce(pieces))))
    return plans


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Merge neighbouring target pieces that are contiguous in the same input file."""
    merged: list[Piece] = []
    for p in pieces:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.tensor is None
            and p.tensor is None
            and last.src_path == p.src_path
            and last.src_off + last.nbytes == p.src_off
            and last.dst_off + last.nbytes == p.dst_off
        ):
            n = last.nbytes + p.nbytes
            merged[-1] = Piece(last.src_path, last.src_off, n, last.dst_off, n, p.src_dtype, p.dst_dtype)
        else:
            merged.append(p)
    return merged


def write_shards(
    tmp: Path, plans: list[ShardPlan], progress: bool, poll: Callable[[], None] | None = None, *, read_next: bool
) -> dict[str, str]:
    """Write every shard; return the sha256 of each source tensor as written.

    Each shard is written front to back (header, then its pieces in order) by a `BlockWriter`:
    through the page cache, or with O_DIRECT when the output is too large to stay there or is not
    `read_next` (see `direct_write.wants_direct`). A source tensor is hashed on the writer's hashing
    thread as it is copied, or, when cast to another dtype, here as it is converted. `poll` is
    called after every step of a copy (see `write_checkpoint`).
    """
    total = sum(p.nbytes for plan in plans for p in plan.pieces)
    digests: dict[str, Any] = {}  # read once the writer is done: it hashes on a thread of its own
    bar = progress_bar(total, "transplant", "B", progress, unit_scale=True)
    pause = _test_pause()
    direct = wants_direct(sum(len(plan.header) for plan in plans) + total, read_next=read_next)
    with ReadOnlyFiles() as files, bar, BlockWriter(direct=direct) as writer:
        for plan in plans:
            dst = writer.create(tmp / plan.name)
            try:
                dst.write(plan.header)
                for p in plan.pieces:
                    src = files.fd(p.src_path)
                    digest = None
                    if p.tensor is not None:
                        digest = digests[p.tensor] = hashlib.sha256()
                    if p.src_dtype != p.dst_dtype:
                        for chunk in converted_chunks(src, p.src_off, p.src_nbytes, p.src_dtype, p.dst_dtype):
                            assert digest is not None  # only source tensors are cast
                            digest.update(chunk)
                            dst.write(chunk)
                            bar.update(len(chunk))
                    else:
                        # In steps, so that the bar, writeback and `poll` keep up with the copy.
                        for step in range(0, p.nbytes, STEP_BYTES):
                            n = min(STEP_BYTES, p.nbytes - step)
                            dst.copy(src, p.src_off + step, n, digest)
                            bar.update(n)
                            if poll is not None:
                                poll()
                    if pause is not None:
                        pause()
            except BaseException:
                dst.abandon()
                raise
            dst.close()
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _link_untouched(tmp: Path, plans: list[ShardPlan], tgt: Checkpoint, same_header: bool) -> set[str]:
    """Hard-link into `tmp` the target shards no selected tensor lives in; return their names.

    A shard is linked only if its header already says `format: pt` (transformers needs it; other shards
    are rewritten with it). Linked shards keep the target's header, without `surgery.provenance`:
    the provenance is in transplant.json. With `same_header`, only a shard whose header is already the
    planned one is linked. Where the output is on another filesystem, nothing is linked.
    """
    linked: set[str] = set()
    for plan, shard in zip(plans, tgt.shards, strict=True):
        if any(p.tensor is not None for p in plan.pieces) or shard.metadata.get("format") != "pt":
            continue
        if same_header and not _has_header(shard.path, plan.header):
            continue
        try:
            os.link(shard.path, tmp / plan.name)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            # Typically EXDEV: the output is on another filesystem than the target.
            print(
                f"note: cannot hard-link the target's shards into {tmp.parent} ({e.strerror}); copying them",
                file=sys.stderr,
            )
            return linked
        linked.add(plan.name)
    return linked


def _has_header(path: Path, header: bytes) -> bool:
    """Whether the file starts with `header` (its length prefix makes a prefix match exact)."""
    with open(path, "rb") as f:
        return f.read(len(header)) == header


def _test_pause() -> Callable[[], None] | None:
    """What to do after each piece under the test hooks (PIECE_DELAY_ENV, HOLD_ENV); None without them."""
    try:
        delay = max(0.0, float(os.environ.get(PIECE_DELAY_ENV, "0")))
    except ValueError:
        delay = 0.0
    hold = os.environ.get(HOLD_ENV)
    if not delay and not hold:
        return None

    def pause() -> None:
        time.sleep(delay)
        while hold and os.path.exists(hold):
            time.sleep(0.01)

    return pause


def _copy_extra_files(src_dir: Path, dst_dir: Path) -> None:
    for rel in copied_files(src_dir):
        (dst_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_dir / rel, dst_dir / rel)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
