"""Which modules a transplant (or a patch) takes from the source: the inputs opened and checked, the
selection options applied, and the provenance every output records.

`select_transplant` is what `transplant`, `write_patch` and `transplant --dry-run` start from:
nothing is written, and every refusal comes before a byte is.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoints.candidates import Candidate, Compatibility, find_candidates
from surgery.checkpoints.folder import Checkpoint, open_checkpoint
from surgery.checkpoints.header import ShardHeader, encode_header
from surgery.checkpoints.staging import check_out
from surgery.checkpoints.streaming import check_alpha, check_blendable, check_convertible
from surgery.errors import SurgeryError
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
from surgery.transplants.records import ManifestRef, Origin, Provenance, SelectionOptions


@dataclass(frozen=True)
class Selected:
    """What a transplant (or a patch) takes from the source, known before a byte is written.

    Attributes:
        target, source: the opened, config-checked inputs.
        manifest: the manifest the modules were chosen from, if any.
        modules: the selected modules, in selection order.
        provenance: tool, source, target and manifest, as recorded in `transplant.json` and every shard header.
        selection: the selection options, as recorded.
        manifest_path: the manifest's file, if any.
        alpha: the source's weight in the selected tensors (`--alpha`; 1 copies them, less blends them with
            the target's: `plan.Blend`).
    """

    target: Checkpoint
    source: Checkpoint
    manifest: Manifest | None
    modules: list[Candidate | ModuleEntry]
    provenance: Provenance
    selection: SelectionOptions
    manifest_path: Path | None = None
    alpha: float = 1.0

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
            alpha=self.alpha,
            **extra,
        )


def provenance_header(provenance: Provenance, shard: ShardHeader) -> bytes:
    """An output shard's header: the target's tensors and metadata, plus `format: pt` and the provenance."""
    recorded = json.dumps(provenance.to_dict(), sort_keys=True)
    metadata = {**shard.metadata, "format": "pt", "surgery.provenance": recorded}
    return encode_header(list(shard.tensors), metadata)


def select_transplant(
    *,
    target: str | Path,
    source: str | Path,
    manifest: str | Path | None = None,
    top_k: int | None = None,
    only: str | None = None,
    layers: tuple[int, int] | None = None,
    modules: Sequence[str] = (),
    force: bool = False,
    trust_remote_code: bool = False,
    out: Path | None = None,
    overwrite: bool = False,
    alpha: float | None = None,
) -> Selected:
    """Open and check the inputs and apply the selection options (see `transplant` for their meaning).

    `out`, when given, is checked (it must not exist unless `overwrite`, nor be an input) before the
    manifest is read. `alpha` (the blend's weight of the source) is checked first, and with a blend every
    selected tensor must be floating point; None takes the alpha `surgery select` chose with the manifest's K
    (when that K is used), else 1. Raises SurgeryError on any invalid input.
    """
    if alpha is not None:
        check_alpha(alpha)
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
        blend = f", alpha {chosen_k.alpha:g}" if alpha is None and chosen_k.alpha != 1 else ""
        print(f"top-k {top_k}{blend} from the manifest's selection ({chosen_k.rule})", file=sys.stderr)
    alpha = float(alpha if alpha is not None else chosen_k.alpha if chosen_k is not None else 1.0)
    # A manifest ranked on these exact checkpoints (the fingerprints cover the config and every tensor's
    # name, dtype and shape) has a candidate list that stands in for rebuilding the model on the meta
    # device. That keeps torch and transformers out of this process: they cost ~340 MiB RSS and seconds
    # of start-up for a job that only moves bytes.
    compat = None if matches else find_candidates(src, tgt, trust_remote_code)
    chosen = _choose(man, compat, src, tgt, top_k, only, layers, modules)
    tensors = sorted(t for c in chosen for t in c.tensors)
    for name in tensors:
        dtypes = (src.tensors[name].info.dtype, tgt.tensors[name].info.dtype, f"tensor {name}")
        check_convertible(*dtypes)
        if alpha != 1:
            check_blendable(*dtypes)
    for line in warnings(src, tgt, tensors):
        print(line, file=sys.stderr)
    manifest_ref = None if man is None else ManifestRef(str(manifest), file_sha256(manifest), man.method.name)
    provenance = Provenance(Origin.of(src), Origin.of(tgt), manifest_ref)
    selection = SelectionOptions(top_k, only, layers, tuple(modules), k_from)
    manifest_path = Path(manifest) if manifest is not None else None
    return Selected(tgt, src, man, chosen, provenance, selection, manifest_path, alpha)


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


def _choose(
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
