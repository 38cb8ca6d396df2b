"""The Hub side of a transplant output: the model card `transplant` writes, and `push` to publish it.

The card is `README.md` in the output, made with huggingface_hub's `ModelCard`/`ModelCardData`:
`base_model` lists the target and source by Hub repo id, the tags mark it as a transplant, and
the body lists the transplanted modules (with scores and ranks from a manifest) and any
evaluation results (also as `model-index` metadata).

`base_model` holds Hub repo ids only: the Hub rejects metadata whose `base_model` is not a model
id, which would make `push` fail. An input given as `org/name[@revision]`, or a folder inside the
HF cache (`.../models--org--name/snapshots/<commit>`), is named by its repo id; a plain local
folder has no Hub id, so it appears in the card body by its folder name only (never its full
path, which would leak local directory names into a public card).

`push` uploads a complete transplant output with `HfApi`. The token comes only from
huggingface_hub's own resolution (`HF_TOKEN`, or `hf auth login`); surgery never reads, prints or
logs it, and error texts from the Hub are masked before they are shown.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from surgery.checkpoints.candidates import Candidate
from surgery.checkpoints.folder import Checkpoint
from surgery.manifest import Manifest, ModuleEntry
from surgery.transplants.records import SelectionOptions
from surgery.version import __version__

TAGS = ["model-transplant", "surgery"]
PAPER_URL = "https://arxiv.org/abs/2602.16189"
# Built-in benchmarks of `surgery eval` -> (Hub dataset id, display name, config), for `model-index`.
_DATASETS = {
    "gsm8k": ("openai/gsm8k", "GSM8K", "main"),
    "math500": ("HuggingFaceH4/MATH-500", "MATH-500", None),
}


def base_models(target: Checkpoint, source: Checkpoint) -> list[str]:
    """The card's `base_model`: the Hub repo ids of target then source (once each); local folders have none."""
    ids = [c.hub.repo_id for c in (target, source) if c.hub is not None]
    return list(dict.fromkeys(ids))


def model_card(
    name: str,
    target: Checkpoint,
    source: Checkpoint,
    modules: Sequence[Candidate | ModuleEntry],
    *,
    manifest: Manifest | None = None,
    selection: SelectionOptions | None = None,
    eval_summaries: Sequence[dict] = (),
    notes: Sequence[str] = (),
    manifest_file: str | None = None,
    alpha: float = 1.0,
) -> ModelCard:
    """Build the model card of a transplant output.

    Args:
        name: the model's name (the output folder's name): the card's title and `model-index` name.
        target, source: the checkpoints the output was made from.
        modules: the transplanted modules, in selection order (manifest entries carry score and rank).
        manifest: the manifest they were selected from, if any (its method and workload are shown).
        selection: the selection options, as in `transplant.json`.
        eval_summaries: evaluation summaries (see `load_eval_summary`) to report.
        notes: lines shown under the evaluation table (e.g. a summary of another model, attached with --force).
        manifest_file: the manifest's file name, for the command that reproduces the output.
        alpha: the source's weight in a blend (`--alpha`); 1, a copy, is not mentioned.

    Returns:
        The card; `card.save(path)` writes it.
    """
    data = ModelCardData(
        base_model=base_models(target, source) or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        model_name=name if eval_summaries else None,
        eval_results=[_eval_result(s) for s in eval_summaries] or None,
    )
    body = [
        f"# {name}",
        "",
        f"{_label(target)} with {len(modules)} module{'s' if len(modules) != 1 else ''} transplanted from "
        f"{_label(source)}: their weights were {_taken(alpha)}, with no training "
        f"([model transplantation]({PAPER_URL})). Made with `surgery transplant` (surgery {__version__}); "
        "`transplant.json` lists every copied tensor with its sha256.",
        "",
        "| role | model | revision | fingerprint |",
        "|---|---|---|---|",
        *(
            f"| {role} | {_label(c)} | {_revision(c)} | `{c.fingerprint}` |"
            for role, c in (("target", target), ("source", source))
        ),
        "",
        "## Selection",
        "",
        *_selection_lines(manifest, selection or SelectionOptions(), alpha),
        "",
        "## Transplanted modules",
        "",
        *_module_table(modules, manifest is not None),
        "",
        "## Use and reproduce",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype="auto")  # this folder, or its Hub repo id',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "```bash",
        _command(name, target, source, manifest_file, selection or SelectionOptions(), alpha),
        "```",
    ]
    if eval_summaries:
        body += ["", "## Evaluation", "", *_eval_table(eval_summaries), *(f"\n> **Note:** {n}" for n in notes)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def renamed(card: str, name: str) -> str:
    """The text of a card `model_card` made, for the model named `name`: its title, its `from_pretrained`
    lines and the `-o` of its command (a patch records the card of the checkpoint it makes under the
    patch folder's name; `apply` writes it under the output's). A card without a title is returned as is.
    """
    title = re.search(r"^# (.+)$", card.split("\n---\n", 1)[-1], re.MULTILINE)
    if title is None:
        return card
    old = re.escape(title.group(1))
    card = re.sub(rf"^# {old}$", lambda _: f"# {name}", card, count=1, flags=re.MULTILINE)
    card = re.sub(rf'from_pretrained\("{old}"', lambda _: f'from_pretrained("{name}"', card)
    command = rf"^(surgery transplant .* -o ){old}(?= |$)"
    return re.sub(command, lambda m: m.group(1) + name, card, count=1, flags=re.MULTILINE)


def patch_card(
    name: str,
    target: Checkpoint,
    source: Checkpoint,
    modules: Sequence[Candidate | ModuleEntry],
    *,
    manifest: Manifest | None = None,
    selection: SelectionOptions | None = None,
    reversible: bool = False,
    alpha: float = 1.0,
) -> ModelCard:
    """Build the model card of a patch folder (`transplant --patch`): what it needs and how to apply it.

    `base_model` is the target alone (a patch is applied to it, as a LoRA adapter is to its base), when
    the target has a Hub id; a local target is named by folder and fingerprint in the body. `alpha` is
    the source's weight in a blend (`--alpha`), as in `model_card`.
    """
    data = ModelCardData(
        base_model=[target.hub.repo_id] if target.hub is not None else None,
        library_name="surgery",
        tags=[*TAGS, "surgery-patch"],
    )
    base = target.hub.repo_id if target.hub is not None else f"path/to/{target.path.name}"
    body = [
        f"# {name}",
        "",
        f"A patch for {_label(target)}: the weights of {len(modules)} module{'s' if len(modules) != 1 else ''} "
        f"taken from {_label(source)}{_blended(alpha)} ([model transplantation]({PAPER_URL})), and nothing else. "
        "It is to a transplant what a LoRA adapter is to a fine-tune: one base, many patches. `patch.json` records the "
        "sha256 of every tensor, before and after, so a patch refuses any other base. Made with "
        f"`surgery transplant --patch` (surgery {__version__}){'; reversible' if reversible else ''}.",
        "",
        "| role | model | revision | fingerprint |",
        "|---|---|---|---|",
        *(
            f"| {role} | {_label(c)} | {_revision(c)} | `{c.fingerprint}` |"
            for role, c in (("base (target)", target), ("source", source))
        ),
        "",
        "## How to apply",
        "",
        "A ready-to-serve checkpoint (tensor for tensor what `surgery transplant` writes):",
        "",
        "```bash",
        f"surgery apply {name} --target {base} -o {name}-applied   # --link shares untouched shards",
        *([f"surgery apply {name} --target {name}-applied -o original --revert"] if reversible else []),
        "```",
        "",
        "In memory, on a loaded model (`undo()` restores it bit for bit):",
        "",
        "```python",
        "import surgery",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")',
        f'handle = surgery.apply_patch(model, "{name}")',
        "handle.undo()",
        "```",
        "",
        "## Selection",
        "",
        *_selection_lines(manifest, selection or SelectionOptions(), alpha),
        "",
        "## Transplanted modules",
        "",
        *_module_table(modules, manifest is not None),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _taken(alpha: float) -> str:
    """How a transplant output's modules got their weights: copied from the source, or blended (`--alpha`)."""
    return "copied from the source into the target" if alpha == 1 else f"blended at {_blend(alpha)}"


def _blended(alpha: float) -> str:
    """What a patch's card adds of a blend (`--alpha`): nothing for a copy."""
    return "" if alpha == 1 else f", blended with the target's at {_blend(alpha)}"


def _blend(alpha: float) -> str:
    """A blend in words: its alpha and its formula."""
    return f"alpha {alpha!r} (target + {alpha!r} * (source - target), in float32 rounded to the target's dtype)"


def _command(
    name: str,
    target: Checkpoint,
    source: Checkpoint,
    manifest_file: str | None,
    selection: SelectionOptions,
    alpha: float,
) -> str:
    """The `surgery transplant` command that writes this output again (local inputs by folder name)."""
    parts = ["surgery transplant", f"-t {_ref(target)}", f"-s {_ref(source)}", f"-o {name}"]
    if manifest_file is not None:
        parts.append(f"-m {manifest_file}")
    if selection.top_k is not None and not selection.top_k_from:
        parts.append(f"-k {selection.top_k}")
    if selection.only:
        parts.append(f"--only {selection.only}")
    if selection.layers:
        parts.append(f"--layers {'-'.join(map(str, selection.layers))}")
    parts += [f"--module '{p}'" for p in selection.patterns]
    if alpha != 1:
        parts.append(f"--alpha {alpha!r}")
    return " ".join(parts)


def _ref(c: Checkpoint) -> str:
    """An input as a command names it: a Hub repo at its commit, or a local folder by name."""
    return f"{c.hub.repo_id}@{c.hub.commit}" if c.hub is not None else c.path.name


def _label(c: Checkpoint) -> str:
    return f"`{c.hub.repo_id}`" if c.hub is not None else f"`{c.path.name}` (local folder)"


def _revision(c: Checkpoint) -> str:
    if c.hub is None:
        return "—"
    asked = f"{c.hub.revision} → " if c.hub.revision and c.hub.revision != c.hub.commit else ""
    return f"{asked}`{c.hub.commit}`"


def _selection_lines(manifest: Manifest | None, selection: SelectionOptions, alpha: float) -> list[str]:
    if manifest is None:
        lines = ["- by module name, no manifest"]
    else:
        w = manifest.workload
        workload = f"`{w.name}` ({w.prompts} prompts, {w.max_new_tokens} new tokens)" if w else "none"
        lines = [f"- manifest: method `{manifest.method.name}`, workload {workload}"]
    options = {
        "top-k": selection.top_k,
        "K": selection.top_k_from,
        "only": selection.only,
        "layers": "-".join(map(str, selection.layers)) if selection.layers else None,
        "module patterns": ", ".join(f"`{p}`" for p in selection.patterns) or None,
        "blend": _blend(alpha) if alpha != 1 else None,
    }
    lines += [f"- {k}: {v}" for k, v in options.items() if v is not None]
    return lines


def _module_table(modules: Sequence[Candidate | ModuleEntry], ranked: bool) -> list[str]:
    if ranked:
        rows = ["| module | kind | layer | score | rank |", "|---|---|---:|---:|---:|"]
    else:
        rows = ["| module | kind | layer |", "|---|---|---:|"]
    for m in modules:
        layer = "—" if m.layer is None else str(m.layer)
        extra = f" {m.score:.6g} | {m.rank} |" if ranked and isinstance(m, ModuleEntry) else ""
        rows.append(f"| `{m.name}` | {m.kind} | {layer} |{extra}")
    return rows


def _eval_result(s: dict) -> EvalResult:
    """One `model-index` entry: accuracy on the benchmark's Hub dataset (or the JSONL's name)."""
    dataset, display, config = _DATASETS.get(s["benchmark"], (s["benchmark"], s["benchmark"], None))
    settings = s.get("settings", {})
    return EvalResult(
        task_type="text-generation",
        task_name="Text Generation",
        dataset_type=dataset,
        dataset_name=display,
        dataset_config=config,
        dataset_split="test" if s["benchmark"] in _DATASETS else None,
        metric_type="accuracy",
        metric_value=s["accuracy"],
        metric_name=f"accuracy (greedy, {settings.get('shots', 0)}-shot, {s['problems']} problems)",
    )


def _eval_table(summaries: Sequence[dict]) -> list[str]:
    rows = [
        "| benchmark | problems | accuracy | 95% CI (Wilson) | shots | max new tokens | model evaluated |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for s in summaries:
        lo, hi = s["accuracy_ci95"]
        settings = s.get("settings", {})
        rows.append(
            f"| {s['benchmark']} | {s['problems']} | {100 * s['accuracy']:.1f}% ({s['correct']}/{s['problems']}) "
            f"| [{100 * lo:.1f}, {100 * hi:.1f}] | {settings.get('shots', '—')} | "
            f"{settings.get('max_new_tokens', '—')} | `{Path(str(s.get('model', '—'))).name}` |"
        )
    rows += ["", "Greedy decoding with `surgery eval`; accuracy is the fraction of problems answered correctly."]
    return rows
