"""Apply a patch (`transplant --patch`): to its target as a ready-to-serve checkpoint, or in memory.

- `apply(P, T, OUT)` writes what `transplant` would have written for the patch's selection: the same
  tensor bytes (a blended patch's as they are: blended when it was written), headers and record, with
  the same guarantees (streaming, atomic, locked).
- `apply(P, PATCHED, OUT, revert=True)` gives the original target back, byte for byte (reversible
  patches only).
- `apply_patch(model, P)` patches a loaded model in place; `.undo()` (or leaving its `with` block)
  restores it bit for bit.

A target of another architecture or layout is refused before a byte is written; the sha256 of the
target's tensors are checked on a second thread while the output is written, so a patch refuses any
model but the one it was made for (the write stops, and the output is discarded). A target whose
patched tensors match but whose fingerprint differs from the recorded one (another config, or other
tensors the patch leaves alone) is refused before the write too, unless `force` (a warning names
what differs). The output's record names the target that was used. The patch's tensors are hashed
as they are copied, and one that differs from the record discards the output before it is published.

A reversible patch's originals are read only by `--revert`, which refuses them missing or damaged;
a forward apply does not need them, and warns that the patch no longer reverts (they are hashed
beside the write: a read the size of the patch).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.checkpoints.digests import tensor_digests
from surgery.checkpoints.folder import Checkpoint, open_checkpoint
from surgery.checkpoints.header import parse_header
from surgery.checkpoints.staging import check_out
from surgery.checkpoints.streaming import ReadOnlyFiles, read_tensor, torch_dtype
from surgery.errors import SurgeryError
from surgery.manifest import file_sha256
from surgery.transplants.patch import (
    PATCH_RECORD,
    Patch,
    check_copied_digests,
    check_patch_digests,
    open_patch,
)
from surgery.transplants.plan import checkpoint_plan
from surgery.transplants.records import Architecture, Origin, PatchRef, TransplantRecord
from surgery.transplants.selection import provenance_header
from surgery.transplants.write import TransplantResult, write_checkpoint

if TYPE_CHECKING:
    import torch

# How a forward apply's warning about a reversible patch's originals ends.
_FORWARD_ONLY = "applying it needs only its patch tensors, but `apply --revert` will refuse it"


def apply(
    patch: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    link: bool = False,
    revert: bool = False,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TransplantResult:
    """Write `target` with `patch` applied (or, with `revert`, a patched checkpoint with it taken back).

    Args:
        patch: a patch folder written by `transplant --patch`.
        target: the checkpoint the patch was made for (never modified); with `revert`, the patched one.
        out: the output folder; must not exist unless `overwrite`.
        link: hard-link the shards the patch does not touch instead of copying them.
        revert: restore the original target (the patch must be reversible, its originals intact).
        force: apply to a target whose patched tensors are the recorded ones but whose fingerprint is not
            (its config, or tensors the patch leaves alone, differ), with a warning naming what differs.
        overwrite: replace an existing `out`, only once the new output is complete.
        progress: show a progress bar of bytes (only when stderr is a terminal).

    Returns:
        What was written (as `transplant` returns it).

    Raises:
        SurgeryError: the patch is incomplete or tampered, the target is not the one it was made for, or
            another input is invalid; nothing is written in that case.
    """
    p = open_patch(patch, check_digests=False, originals=revert)
    tgt = open_checkpoint(target)
    tgt.check_config()
    out = check_out(Path(out), {"target": tgt.path, "patch": p.path}, overwrite)
    if revert and not p.reversible:
        raise SurgeryError(f"{p.path} is not reversible; write it with `surgery transplant --patch --reversible`")
    _check_layout(p, tgt)
    # A target that is not the recorded one (by fingerprint) has its patched tensors hashed first, so
    # that another model is named by its first differing tensor, and what else differs refuses it.
    checked_first = not revert and tgt.fingerprint != p.record.provenance.target.fingerprint
    if checked_first:
        _check_digests(p, tgt, revert=False)
        _check_fingerprint(p, tgt, force)
    if p.originals_problem:
        print(f"warning: {p.originals_problem}; {_FORWARD_ONLY}", file=sys.stderr)
    # Otherwise the target's tensors are hashed on a second thread while the output is written: a
    # wrong target stops the write as soon as it is found. The patch's tensors are hashed as they are
    # copied (so they are read once). Either fault discards the output; a wrong target is the one named.
    with ThreadPoolExecutor(1, thread_name_prefix="surgery-check") as pool:
        checked = pool.submit(_check_inputs, p, tgt, revert, checked_first)

        def poll() -> None:
            if checked.done():
                checked.result()

        def check(written: dict[str, str]) -> None:
            warning = checked.result()
            check_copied_digests(p, written, originals=revert)
            if warning:
                print(warning, file=sys.stderr)

        return _write(
            p, tgt, out, revert=revert, link=link, overwrite=overwrite, progress=progress, poll=poll, check=check
        )


def _check_inputs(p: Patch, tgt: Checkpoint, revert: bool, checked_first: bool) -> str | None:
    """The target's digests (unless `checked_first`); for a forward apply, a warning if the patch's
    originals differ from their record (only `--revert` uses them, and refuses them)."""
    if not checked_first:
        _check_digests(p, tgt, revert=revert)
    if revert or not p.reversible:
        return None
    try:
        check_patch_digests(p, tensors=False)
    except SurgeryError as e:
        return f"warning: {e}; {_FORWARD_ONLY}"
    return None


def _check_fingerprint(p: Patch, tgt: Checkpoint, force: bool) -> None:
    """Refuse (or, with `force`, warn about) a target whose fingerprint differs from the patch's record,
    naming what differs: config keys, else tensors the patch leaves alone."""
    recorded = p.record.target_config
    if recorded is None:  # a patch written before patches recorded the target's config
        what = "its config.json or the tensors the patch leaves alone"
    else:
        keys = sorted(k for k in recorded.keys() | tgt.config.keys() if recorded.get(k) != tgt.config.get(k))
        shown = ", ".join(f"{k} ({tgt.config.get(k)!r}, recorded {recorded.get(k)!r})" for k in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        what = (
            f"config.json: {shown}{more}" if keys else "tensors the patch leaves alone (names, dtypes, shapes or bytes)"
        )
    msg = f"{tgt.path} differs from the target this patch was made for, {_made_for(p)}, in {what}"
    if not force:
        raise SurgeryError(f"{msg}; pass that target, or --force to apply the patch anyway")
    print(f"warning: {msg}; applying the patch anyway because of --force", file=sys.stderr)


def _write(
    p: Patch,
    tgt: Checkpoint,
    out: Path,
    *,
    revert: bool,
    link: bool,
    overwrite: bool,
    progress: bool,
    poll: Callable[[], None],
    check: Callable[[dict[str, str]], None],
) -> TransplantResult:
    """`apply`'s output, written with `write_checkpoint`; `poll` and `check` as there."""
    modules = tuple(p.modules)
    if revert:
        headers = _original_headers(p, tgt)
        original = p.record.original
        assert original is not None  # PatchRecord.from_dict refuses a reversible one without
        replacements = {n: t.original for n, t in p.tensors.items() if t.original is not None}
        # Only a shard whose header is already the original's is linked: the others get theirs back.
        plan = checkpoint_plan(
            tgt, replacements, lambda shard: headers[shard.path.name], link=link, link_same_header=True
        )
        written = write_checkpoint(
            out,
            tgt,
            plan,
            record=None,
            card=original.card,
            overwrite=overwrite,
            link=link,
            progress=progress,
            index_text=original.index,
            poll=poll,
            check=check,
        )
        return TransplantResult.made(out, modules, written, tgt)
    # The target is the one given (it may be a copy of the recorded one, or differ with --force).
    provenance = replace(p.record.provenance, target=Origin.of(tgt))
    patch_ref = PatchRef(str(p.path), file_sha256(p.path / PATCH_RECORD))
    # A blended patch's tensors are blended already: written as they are, recorded with the patch's alpha.
    alpha = p.record.alpha
    record = TransplantRecord(provenance, p.record.selection, modules, patch=patch_ref, alpha=alpha)
    plan = checkpoint_plan(
        tgt, {n: t.data for n, t in p.tensors.items()}, partial(provenance_header, provenance), link=link
    )
    written = write_checkpoint(
        out,
        tgt,
        plan,
        record=record,
        card=partial(_card, p.record.card, out.name),
        overwrite=overwrite,
        link=link,
        progress=progress,
        source_dtypes={t.name: t.source_dtype for t in p.record.tensors},
        poll=poll,
        check=check,
    )
    return TransplantResult.made(out, modules, written, tgt, alpha)


def _card(card: str, name: str) -> str:
    """The card the patch recorded, named after the output (as `transplant` names its own)."""
    from surgery.transplants.card import renamed  # huggingface_hub's card classes: ~0.25 s to import

    return renamed(card, name)


def _made_for(p: Patch) -> str:
    target = p.record.provenance.target
    return f"{target.path} ({target.fingerprint[:19]}…)"


def _check_layout(p: Patch, ckpt: Checkpoint) -> None:
    """Refuse a checkpoint of another architecture, or whose patched tensors differ in dtype or shape.

    Checked before the digests, so that a model of another architecture or size is named as such.
    """
    made_for = _made_for(p)
    check_architecture(p, ckpt.config, str(ckpt.path))
    for t in p.tensors.values():
        ref = ckpt.tensors.get(t.name)
        if ref is None or (ref.info.dtype, ref.info.shape) != (t.dtype, t.shape):
            have = "missing" if ref is None else f"{ref.info.dtype} {list(ref.info.shape)}"
            raise SurgeryError(
                f"{ckpt.path} is not the model this patch is for: tensor {t.name} is {have}, the patch's is "
                f"{t.dtype} {list(t.shape)}; the patch was made for {made_for}"
            )


def _check_digests(p: Patch, ckpt: Checkpoint, *, revert: bool) -> None:
    """Refuse a checkpoint whose patched tensors are not the ones the patch expects (sha256), naming the first."""
    # Read, never taken from the cache: this check is what stands between a patch and the wrong model.
    found = tensor_digests(ckpt, list(p.tensors), use_cache=False)
    for t in p.tensors.values():
        digest = found[t.name]
        want, other = (t.sha256, t.target_sha256) if revert else (t.target_sha256, t.sha256)
        if digest == want:
            continue
        if revert:
            why = "it is the unpatched target already" if digest == other else "it is not this patch applied"
            raise SurgeryError(
                f"{ckpt.path}: tensor {t.name} differs from the patch's (sha256): {why}; "
                "pass the checkpoint `surgery apply` wrote with this patch"
            )
        why = "the patch is applied there already" if digest == other else "another model or version"
        raise SurgeryError(
            f"{ckpt.path}: tensor {t.name} differs from the target this patch was made for (sha256; {why}); "
            f"pass {_made_for(p)}"
        )


def check_architecture(p: Patch, config: dict, what: str) -> None:
    """Refuse a model whose config names another architecture than the patch's target."""
    want, have = p.record.architecture, Architecture.of(config)
    if want.differs(have):
        raise SurgeryError(
            f"{what} is {have}, but this patch is for {want}; apply it to {p.record.provenance.target.path}"
        )


def _original_headers(p: Patch, ckpt: Checkpoint) -> dict[str, bytes]:
    """The original target's shard headers (length prefix included), checked against the patched layout."""
    assert p.record.original is not None  # PatchRecord.from_dict refuses a reversible one without
    stored_headers = p.record.original.shard_headers
    if sorted(stored_headers) != sorted(s.path.name for s in ckpt.shards):
        raise SurgeryError(f"{ckpt.path}: its shard files differ from the target's this patch recorded")
    headers = {}
    for shard in ckpt.shards:
        raw = stored_headers[shard.path.name].encode("utf-8")
        data_len = shard.tensors[-1].end if shard.tensors else 0
        original = parse_header(shard.path, raw, 8 + len(raw) + data_len)
        if original.tensors != shard.tensors:
            raise SurgeryError(f"{shard.path}: its tensors are laid out unlike the target's this patch recorded")
        headers[shard.path.name] = struct.pack("<Q", len(raw)) + raw
    return headers


@dataclass
class AppliedPatch:
    """A patch applied in memory by `apply_patch`; `undo()` puts the original tensors back, bit for bit.

    Also a context manager: `with apply_patch(model, P): ...` undoes the patch when the block ends,
    an exception included.
    """

    patch: Patch
    model: torch.nn.Module
    _saved: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __enter__(self) -> AppliedPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def undo(self) -> None:
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self._saved.items():
                params[name].copy_(original)
        self._saved.clear()


def apply_patch(model: torch.nn.Module, patch: str | Path | Patch) -> AppliedPatch:
    """Patch a loaded `PreTrainedModel` in place; return a handle whose `.undo()` restores it exactly
    (or use it as `with apply_patch(model, P):`, which undoes the patch on leaving the block).

    Where a parameter has the patch's dtype, its bytes must have the sha256 the patch recorded for the
    target (else SurgeryError, and the model is left as it was). A model loaded in another dtype (say
    bfloat16 from a float32 checkpoint) is checked by shape only, and gets the patch cast to its dtype.

    Raises:
        SurgeryError: the patch is invalid, or the model is not the one it was made for.
    """
    import hashlib

    import torch

    # The originals are not used here: a reversible patch whose originals are gone still applies.
    p = patch if isinstance(patch, Patch) else open_patch(patch, originals=False)
    check_architecture(p, model.config.to_dict(), "the model")
    params = dict(model.named_parameters())
    for t in p.tensors.values():
        param = params.get(t.name)
        if param is None or tuple(param.shape) != t.shape:
            have = "missing" if param is None else f"of shape {list(param.shape)}"
            raise SurgeryError(
                f"the model is not the one this patch is for: parameter {t.name} is {have}, the patch's is "
                f"{list(t.shape)}; load {p.record.provenance.target.path}"
            )
    for t in p.tensors.values():
        param = params[t.name]
        if param.dtype == torch_dtype(t.dtype):
            data = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            if hashlib.sha256(data).hexdigest() != t.target_sha256:
                raise SurgeryError(
                    f"the model's parameter {t.name} differs from the target this patch was made for (sha256); "
                    f"load {p.record.provenance.target.path} (or undo the patch applied before)"
                )
    handle = AppliedPatch(p, model)
    with ReadOnlyFiles() as files, torch.no_grad():
        for t in p.tensors.values():
            param = params[t.name]
            new = read_tensor(files.fd(t.data.path), t.data.offset, t.data.nbytes, t.dtype, t.shape)
            handle._saved[t.name] = param.detach().clone()
            param.copy_(new.to(param.dtype))
    return handle
