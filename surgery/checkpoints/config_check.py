"""Check `config.json` against the tensors, before any model is built from it.

The config decides what transformers builds (`from_config`, `from_pretrained`): a config that
claims 200,000 layers over the tensors of 4 makes the meta-device build loop for minutes, and one
whose widths disagree with the tensors yields an output `from_pretrained` cannot load. Every count
and width that the architecture names in its tensors is compared here, from the headers alone, so
that no command builds, allocates or loops in proportion to a number the input does not back with
bytes.

Checked where the tensors name them: the number of layers (distinct `layers.N`), the number of
experts (distinct `experts.N`), the hidden size and vocabulary (the input embedding), the MLP
width (`mlp.up_proj`/`gate_proj`/`down_proj`), and the attention projections (`q_proj`, `k_proj`,
`v_proj`, `o_proj` against heads x head_dim).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from surgery.checkpoints.header import TensorInfo

_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<index>\d+)\.")
_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
# Config fields naming the routed experts per MoE layer, by architecture family.
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ConfigMismatch:
    """One disagreement between `config.json` and the tensors."""

    field: str
    claimed: object
    found: str
    tensor: str

    def message(self) -> str:
        return f"config.json says {self.field}={self.claimed!r} but the checkpoint has {self.found} ({self.tensor})"


def text_config(config: Mapping) -> Mapping:
    """The language model's fields: multimodal configs (Gemma-3, Llava) keep them in `text_config`."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def config_mismatches(config: Mapping, tensors: Mapping[str, TensorInfo]) -> list[ConfigMismatch]:
    """Every disagreement between a config and the tensor headers, first the layer count.

    Args:
        config: the parsed `config.json`.
        tensors: tensor name -> header entry, for every tensor of the checkpoint.

    Returns:
        The mismatches; empty when the config matches what the tensors hold.
    """
    cfg = text_config(config)
    out: list[ConfigMismatch] = []

    layers: dict[str, set[int]] = {}
    for name in tensors:
        m = _LAYER_RE.match(name)
        if m:
            layers.setdefault(m["prefix"], set()).add(int(m["index"]))
    decoder = ""
    if layers:
        # The decoder stack: the `layers` prefix the config's count matches, else the longest one (a
        # vision tower may have its own `layers`, with other widths: only the decoder's are checked).
        claimed = cfg.get("num_hidden_layers")
        # DeepSeek-V3 stores its multi-token-prediction layers after the decoder's.
        extra = cfg.get("num_nextn_predict_layers", 0)
        expected = claimed + (extra if _is_count(extra) else 0) if _is_count(claimed) else None
        matching = [prefix for prefix, ix in layers.items() if len(ix) == expected]
        decoder = matching[0] if matching else max(layers, key=lambda prefix: len(layers[prefix]))
        if "num_hidden_layers" in cfg and not matching:
            indices = layers[decoder]
            span = f"{decoder}.{min(indices)}-{max(indices)}"
            out.append(ConfigMismatch("num_hidden_layers", claimed, f"tensors for {len(indices)} layers", span))
    in_decoder = {name: info for name, info in tensors.items() if name.startswith(decoder)}

    experts = {int(m.group(1)) for name in tensors for m in [_EXPERT_RE.search(name)] if m}
    for field in _EXPERT_FIELDS:
        claimed = cfg.get(field)
        if claimed is None or claimed == 0:
            continue
        if not _is_count(claimed) or claimed != len(experts):
            out.append(ConfigMismatch(field, claimed, f"tensors for {len(experts)} experts", "*.experts.N.*"))

    embed = next((n for n in tensors if n.endswith(_EMBED_SUFFIXES)), None)
    if embed is not None and len(tensors[embed].shape) == 2:
        rows, width = tensors[embed].shape
        _expect(out, cfg, "vocab_size", rows, f"{rows} embedding rows", embed)
        _expect(out, cfg, "hidden_size", width, f"embeddings of width {width}", embed)

    _check_mlp(out, cfg, in_decoder)
    _check_attention(out, cfg, in_decoder)
    return out


def _check_mlp(out: list[ConfigMismatch], cfg: Mapping, tensors: Mapping[str, TensorInfo]) -> None:
    for name, info in tensors.items():
        if not name.endswith((".mlp.up_proj.weight", ".mlp.gate_proj.weight", ".mlp.down_proj.weight")):
            continue
        if len(info.shape) != 2:
            continue
        width = info.shape[1] if name.endswith("down_proj.weight") else info.shape[0]
        if _expect(out, cfg, "intermediate_size", width, f"an MLP of width {width}", name):
            return


def _check_attention(out: list[ConfigMismatch], cfg: Mapping, tensors: Mapping[str, TensorInfo]) -> None:
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    hidden = cfg.get("hidden_size")
    if not (_is_count(heads) and _is_count(hidden)):
        for field, value in (("num_attention_heads", heads), ("hidden_size", hidden)):
            if value is not None and not _is_count(value):
                out.append(ConfigMismatch(field, value, "a positive count expected", "config.json"))
                return
        return
    head_dim = cfg.get("head_dim") or hidden // heads
    if not _is_count(head_dim):
        out.append(ConfigMismatch("head_dim", cfg.get("head_dim"), "a positive count expected", "config.json"))
        return
    # (projection, field, count, which dimension holds count x head_dim), checked in this order.
    checks = (
        ("q_proj", "num_attention_heads", heads, 0),
        ("k_proj", "num_key_value_heads", kv_heads, 0),
        ("v_proj", "num_key_value_heads", kv_heads, 0),
        ("o_proj", "num_attention_heads", heads, 1),
    )
    for proj, field, count, dim in checks:
        for name, info in tensors.items():
            if not name.endswith(f".self_attn.{proj}.weight") or len(info.shape) != 2:
                continue
            if not _is_count(count) or count * head_dim != info.shape[dim]:
                what = "rows" if dim == 0 else "columns"
                out.append(
                    ConfigMismatch(
                        field, count, f"{proj} of {info.shape[dim]} {what} (heads x head_dim {head_dim})", name
                    )
                )
                return


def _expect(out: list[ConfigMismatch], cfg: Mapping, field: str, actual: int, found: str, tensor: str) -> bool:
    """Record a mismatch if `cfg[field]` is present and differs from `actual`; True if one was recorded."""
    if field not in cfg:
        return False
    claimed = cfg[field]
    if _is_count(claimed) and claimed == actual:
        return False
    out.append(ConfigMismatch(field, claimed, found, tensor))
    return True


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def describe(mismatches: Sequence[ConfigMismatch]) -> str:
    """One line for `inspect`: `matches the tensors`, or the first disagreement (and how many more)."""
    if not mismatches:
        return "matches the tensors"
    more = f" (+{len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
    return mismatches[0].message() + more
