"""Which modules can be transplanted between two checkpoints, and why the others cannot."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.checkpoints.cache import cache_file, read_entry, write_entry
from surgery.checkpoints.folder import Checkpoint
from surgery.errors import SurgeryError, one_line

if TYPE_CHECKING:
    from torch import nn

_LAYER_RE = re.compile(r"\.(\d+)\.")
_ATTN_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class Candidate:
    """A transplantable leaf `nn.Linear`.

    Attributes:
        name: module path, e.g. `model.layers.3.mlp.down_proj`.
        kind: `attn`, `mlp` or `other`.
        layer: decoder layer index, or None when the name has none.
        tensors: checkpoint tensor names moved with the module (weight, and bias if any).
        shape: the weight's shape, equal in source and target.
    """

    name: str
    kind: str
    layer: int | None
    tensors: tuple[str, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Exclusion:
    name: str
    reason: str


@dataclass(frozen=True)
class Compatibility:
    """The result of matching two checkpoints' modules (see `find_candidates`)."""

    candidates: tuple[Candidate, ...]
    excluded: tuple[Exclusion, ...]

    @property
    def layers(self) -> int:
        return len({c.layer for c in self.candidates if c.layer is not None})

    def count(self, kind: str) -> int:
        return sum(c.kind == kind for c in self.candidates)

    def summary(self) -> str:
        kinds = ", ".join(f"{self.count(k)} {k}" for k in ("attn", "mlp", "other") if self.count(k))
        return (
            f"{len(self.candidates)} transplantable modules in {self.layers} layers ({kinds or 'none'}); "
            f"{len(self.excluded)} excluded"
        )


def module_kind(name: str) -> str:
    """Classify a module path as `attn`, `mlp` or `other` by its components."""
    parts = name.lower().split(".")
    if any(h in p for p in parts for h in _ATTN_HINTS):
        return "attn"
    if any(h in p for p in parts for h in _MLP_HINTS):
        return "mlp"
    return "other"


def module_layer(name: str) -> int | None:
    """The first numeric path component, which is the decoder layer in HF naming."""
    m = _LAYER_RE.search(f".{name}.")
    return int(m.group(1)) if m else None


def load_config(ckpt: Checkpoint, trust_remote_code: bool = False):
    """Load the checkpoint's `transformers` config, offline.

    Raises:
        SurgeryError: the config needs custom code (and `trust_remote_code` is off) or
            transformers does not know the architecture.
    """
    from transformers import AutoConfig

    if ckpt.config.get("auto_map") and not trust_remote_code:
        raise SurgeryError(
            f"{ckpt.path}: config.json has auto_map (custom model code), which surgery does not run by default; "
            "pass --trust-remote-code only if you trust this checkpoint"
        )
    try:
        return AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:  # transformers' config validation raises many types; all are bad input
        first = one_line(e)
        raise SurgeryError(
            f"{ckpt.path}: transformers cannot load this config offline ({first}); upgrade transformers, "
            "or pass --trust-remote-code if the model needs custom code"
        ) from None


def meta_model(config, ckpt: Checkpoint) -> nn.Module:
    """Build the model from its config on the meta device: the module tree, no weights.

    Raises:
        SurgeryError: transformers cannot build a model from this config (naming `ckpt`'s config.json).
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # any failure to build from a config is a bad config
        raise SurgeryError(f"{ckpt.path}/config.json: transformers cannot build this model ({one_line(e)})") from None


def find_candidates(source: Checkpoint, target: Checkpoint, trust_remote_code: bool = False) -> Compatibility:
    """Match the leaf `nn.Linear` modules of two checkpoints of the same architecture.

    A module is a candidate when every parameter tensor exists in both checkpoints under
    the same name with the same shape. Embeddings, norms and the output head are excluded.

    Args:
        source: the checkpoint modules are taken from.
        target: the checkpoint they are written into.
        trust_remote_code: allow configs that need custom code.

    Returns:
        Candidates in module order, and exclusions with their reasons.

    Raises:
        SurgeryError: the architectures differ, or a config cannot be loaded.
    """
    src_arch = (source.config.get("model_type"), source.config.get("architectures"))
    tgt_arch = (target.config.get("model_type"), target.config.get("architectures"))
    if src_arch != tgt_arch:
        raise SurgeryError(
            f"architectures differ: source is {src_arch[0]} {src_arch[1]}, target is {tgt_arch[0]} {tgt_arch[1]}; "
            "transplanting needs two checkpoints of the same architecture"
        )
    # The config decides what is built: refuse one the tensors do not back before building anything.
    source.check_config()
    target.check_config()
    cache = None if trust_remote_code or target.config.get("auto_map") else _cache_file(source, target)
    cached = _read_cache(cache) if cache is not None else None
    if cached is not None:
        return cached
    result = _match(source, target, trust_remote_code)
    if cache is not None:
        write_entry(cache, asdict(result))
    return result


def _cache_file(source: Checkpoint, target: Checkpoint) -> Path:
    """The cache entry for this pair: keyed by everything the match depends on.

    Building the model on the meta device costs seconds (transformers' auto registry and the modeling
    code), while the result depends only on the target's config, both checkpoints' tensor names and
    shapes, and the transformers version; weights play no part. So repeated transplants of one
    architecture start in well under a second.
    """
    h = hashlib.sha256(json.dumps(target.config, sort_keys=True).encode())
    h.update(version("transformers").encode())
    for ckpt in (source, target):
        h.update(b"\0" + "\n".join(f"{n}\t{list(r.info.shape)}" for n, r in sorted(ckpt.tensors.items())).encode())
    return cache_file("candidates", h.hexdigest())


def _read_cache(path: Path) -> Compatibility | None:
    """A cached match, or None when absent or unreadable (it is then recomputed and rewritten)."""
    obj = read_entry(path)
    try:
        return Compatibility(
            tuple(
                Candidate(c["name"], c["kind"], c["layer"], tuple(c["tensors"]), tuple(c["shape"]))
                for c in obj["candidates"]
            ),
            tuple(Exclusion(e["name"], e["reason"]) for e in obj["excluded"]),
        )
    except (KeyError, TypeError):
        return None


def _match(source: Checkpoint, target: Checkpoint, trust_remote_code: bool) -> Compatibility:
    """Build the target's module tree on the meta device and match its leaf modules against both checkpoints."""
    model = meta_model(load_config(target, trust_remote_code), target)
    head = model.get_output_embeddings()

    candidates: list[Candidate] = []
    excluded: list[Exclusion] = []
    for name, module in model.named_modules():
        params = [p for p, _ in module.named_parameters(recurse=False)]
        if not params:
            continue
        reason = _structural_exclusion(module, head)
        tensors = tuple(f"{name}.{p}" for p in params)
        if reason is None:
            reason = _tensor_mismatch(tensors, source, target)
        if reason is not None:
            excluded.append(Exclusion(name, reason))
            continue
        weight = target.tensors[f"{name}.weight"].info
        candidates.append(Candidate(name, module_kind(name), module_layer(name), tensors, weight.shape))
    return Compatibility(tuple(candidates), tuple(excluded))


def _structural_exclusion(module: nn.Module, head: nn.Module | None) -> str | None:
    from torch import nn

    if module is head:
        return "output head (lm_head) is not transplanted"
    if isinstance(module, nn.Embedding):
        return "embedding is not transplanted"
    if not isinstance(module, nn.Linear):
        kind = type(module).__name__
        if "norm" in kind.lower():
            return f"normalization layer ({kind}) is not transplanted"
        return f"not an nn.Linear ({kind})"
    return None


def _tensor_mismatch(tensors: tuple[str, ...], source: Checkpoint, target: Checkpoint) -> str | None:
    for t in tensors:
        if t not in target.tensors:
            return f"tensor {t} missing from target"
        if t not in source.tensors:
            return f"tensor {t} missing from source"
        s, g = source.tensors[t].info.shape, target.tensors[t].info.shape
        if s != g:
            return f"shape differs for {t}: source {list(s)}, target {list(g)}"
    return None
