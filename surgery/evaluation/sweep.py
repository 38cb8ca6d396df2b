"""`surgery sweep`: accuracy, TIR and Recovery against K, without writing a checkpoint per K.

The target is loaded once. For each K the selected modules' tensors are copied in place from
the memory-mapped source (cast to the target's dtype), the model is evaluated, and the
original tensors are copied back, bit for bit. A seeded random-K selection is evaluated the
same way beside it: the baseline the ranking must beat.
"""

from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

from surgery.analysis.ranking import build_manifest
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import open_checkpoint
from surgery.checkpoints.loading import load_model, load_tokenizer
from surgery.checkpoints.swap import swapped
from surgery.distributed import dist_info
from surgery.errors import SurgeryError
from surgery.evaluation.report import report
from surgery.evaluation.runner import evaluate_loaded, prepare, problem_ids_sha256
from surgery.evaluation.summary import EvalSettings
from surgery.fileio import write_atomic, write_json_atomic
from surgery.manifest import file_sha256, load_manifest, select_modules


def _parse_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SurgeryError(f"{what} {text!r} is not a comma-separated list of integers, e.g. 8,16,32") from None
    if not values or any(v <= 0 for v in values):
        raise SurgeryError(f"{what} {text!r} must list positive integers, e.g. 8,16,32")
    return sorted(set(values))


DEFAULT_KS = "8,16,32,64,128"


def clip_grid(grid: list[int], modules: int) -> list[int]:
    """A default K grid cut to a manifest of `modules` modules, ending at min(modules, largest K)."""
    return sorted({k for k in grid if k < modules} | {min(modules, max(grid))})


def sweep(
    target: str | Path,
    source: str | Path,
    manifest: str | Path,
    ks: str | None,
    max_new_tokens: str,
    benchmark: str,
    out: str | Path,
    *,
    limit: int | None = None,
    seed: int = 42,
    shots: int = 0,
    chat: bool = True,
    batch_size: int = 16,
    dtype: str = "auto",
    random_seed: int = 0,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate source, target, and the target patched with the top-K (and random-K) modules.

    Args:
        target, source: checkpoint folders.
        manifest: the ranking to take the top K from.
        ks: comma-separated K values, e.g. "8,16,32"; None for DEFAULT_KS, clipped to the manifest's modules.
        max_new_tokens: comma-separated decoding budgets, e.g. "64,128".
        benchmark, limit, seed, shots, chat, batch_size, dtype: as in `evaluate`.
        out: folder for every evaluation, the table (sweep.md, sweep.json) and the plot (sweep.png).
        random_seed: seed of the random-K baseline.
        force: accept a manifest made for other checkpoints.

    Returns:
        The table as a dict (also in sweep.json).
    """
    default_ks = ks is None
    k_values, budgets = _parse_list(ks or DEFAULT_KS, "--ks"), _parse_list(max_new_tokens, "--max-new-tokens")
    tgt, src = open_checkpoint(target), open_checkpoint(source)
    man = load_manifest(manifest)
    if not force and (man.source.fingerprint, man.target.fingerprint) != (src.fingerprint, tgt.fingerprint):
        raise SurgeryError("the manifest was made for other checkpoints; pass the ones it names, or --force")
    if k_values[-1] > len(man.modules):
        if not default_ks:
            raise SurgeryError(f"--ks {k_values[-1]} is more than the manifest's {len(man.modules)} modules")
        # The default grid is clipped to the manifest's modules (and includes all of them), and says so.
        k_values = clip_grid(k_values, len(man.modules))
        print(f"note: the manifest ranks {len(man.modules)} modules; K = {k_values}", file=sys.stderr)
    compat = find_candidates(src, tgt, trust_remote_code)
    rand = build_manifest("random", src, tgt, compat, seed=random_seed)
    bench, problems = prepare(benchmark, limit, seed, shots)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_sha = file_sha256(manifest)

    def run(lm, tokenizer, label: str, fingerprint: str, budget: int) -> None:
        settings = EvalSettings(
            bench.name, bench.sha256, problem_ids_sha256(problems), limit, seed, shots, chat, budget, dtype, fingerprint
        )
        evaluate_loaded(
            lm, tokenizer, bench, problems, settings, out / f"{label}-m{budget}", label, batch_size, progress
        )

    for ckpt in (src, tgt):
        tokenizer = load_tokenizer(ckpt.path, trust_remote_code)
        with tempfile.TemporaryDirectory(prefix="surgery-offload-") as offload:
            lm = load_model(ckpt.path, dtype, None, trust_remote_code, Path(offload))
            name = "source" if ckpt is src else "target"
            for budget in budgets:
                run(lm, tokenizer, name, ckpt.fingerprint, budget)
                if ckpt is src:
                    continue
                for k in k_values:
                    # What identifies each patched model: the manifest for the ranking, only the seed for
                    # random-K, so sweeps of several manifests into one folder share the random baseline.
                    for method, ranking, origin in (
                        (man.method.name, man.modules, manifest_sha),
                        ("random", rand.modules, f"seed {random_seed}"),
                    ):
                        chosen = [t for m in select_modules(ranking, top_k=k) for t in m.tensors]
                        with swapped(lm, src, chosen):
                            run(lm, tokenizer, f"{method}-k{k}", f"{tgt.fingerprint}+{origin}:{method}:{k}", budget)
            del lm
            gc.collect()

    table = _table(out, man.method.name, k_values, budgets)
    if dist_info()[0] == 0:  # under torchrun every rank has the table; one writes it
        write_json_atomic(out / "sweep.json", table)
        write_atomic(out / "sweep.md", markdown(table).encode("utf-8"))
        _plot(table, out / "sweep.png")
    return table


def _table(out: Path, method: str, k_values: list[int], budgets: list[int]) -> dict:
    rows = []
    for budget in budgets:
        for k in k_values:
            folders = [out / f"{m}-k{k}-m{budget}" for m in (method, "random")]
            r = report(out / f"source-m{budget}", out / f"target-m{budget}", folders)
            for row, m in zip(r["rows"], (method, "random"), strict=True):
                rows.append(
                    {
                        "max_new_tokens": budget,
                        "k": k,
                        "method": m,
                        "source": r["source"]["accuracy"],
                        "target": r["target"]["accuracy"],
                        **{
                            x: row[x]
                            for x in (
                                *("accuracy", "accuracy_ci95", "tir", "tir_ci95", "recovery_pct", "recovery_ci95"),
                                *("nll", "nll_recovery_pct", "nll_recovery_ci95"),
                            )
                        },
                    }
                )
    return {"method": method, "k": k_values, "max_new_tokens": budgets, "rows": rows}


def markdown(table: dict) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "undefined" if x is None else format(x, fmt)

    head = "| max_new_tokens | K | method | source | target | patched | TIR | Recovery % | gold NLL | NLL Recovery % |"
    lines = [head, "|---" * 10 + "|"]
    for r in table["rows"]:
        lines.append(
            f"| {r['max_new_tokens']} | {r['k']} | {r['method']} | {100 * r['source']:.1f}% | {100 * r['target']:.1f}% "
            f"| {100 * r['accuracy']:.1f}% | {num(r['tir'], '.2f')} | {num(r['recovery_pct'], '.1f')} "
            f"| {num(r['nll'], '.4f')} | {num(r['nll_recovery_pct'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def _plot(table: dict, path: Path) -> None:
    """Accuracy, TIR, Recovery and gold-NLL Recovery against K: a line per max_new_tokens, random-K dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for budget in table["max_new_tokens"]:
        for method, style in ((table["method"], "-o"), ("random", "--x")):
            rows = [r for r in table["rows"] if r["max_new_tokens"] == budget and r["method"] == method]
            ks = [r["k"] for r in rows]
            axes[0].plot(ks, [100 * r["accuracy"] for r in rows], style, label=f"{method}, {budget} tok")
            for ax, key in ((axes[1], "tir"), (axes[2], "recovery_pct"), (axes[3], "nll_recovery_pct")):
                pts = [(r["k"], r[key]) for r in rows if r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{method}, {budget} tok")
        first = next(r for r in table["rows"] if r["max_new_tokens"] == budget)
        axes[0].axhline(100 * first["source"], color="green", lw=0.8, ls=":", label=f"source, {budget} tok")
        axes[0].axhline(100 * first["target"], color="red", lw=0.8, ls=":", label=f"target, {budget} tok")
    titles = ("accuracy %", "TIR (patched / target)", "Recovery %", "gold-NLL Recovery %")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (modules transplanted)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
