"""`surgery sweep`: accuracy, TIR and Recovery against K (and alpha), without writing a checkpoint per K.

The target is loaded once. For each K the selected modules' tensors are copied in place from
the memory-mapped source (cast to the target's dtype), or with `alphas` blended with the target's
(`target + alpha * (source - target)`, as `transplant --alpha` writes them), the model is evaluated,
and the original tensors are copied back, bit for bit. A seeded random-K selection is evaluated the
same way beside it: the baseline the ranking must beat. With keep sets, every model's keep NLL is
measured into its folder too, and each row gets its Retention: what the patch costs the target.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from surgery.analysis.nll import encode_gold
from surgery.analysis.ranking import baseline_method, build_manifest
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import open_checkpoint
from surgery.checkpoints.loading import load_tokenizer, with_model
from surgery.checkpoints.options import ModelOptions
from surgery.checkpoints.swap import swapped
from surgery.distributed import dist_info
from surgery.evaluation.k_grid import SWEEP_SMALLEST_K, default_grid, parse_alphas, parse_ints, parse_ks
from surgery.evaluation.keep import keep_sets
from surgery.evaluation.metrics import Retention, describe
from surgery.evaluation.report import Interval, report
from surgery.evaluation.runner import eval_settings, evaluate_loaded, keep_pending, measure_keep, prepare
from surgery.fileio import write_atomic, write_json_atomic
from surgery.manifest import check_ranked_for, file_sha256, load_manifest, select_modules
from surgery.transplants.records import ManifestRef
from surgery.transplants.write import output_fingerprint


@dataclass(frozen=True)
class SweepRow:
    """One evaluation of the target patched with a ranking's top K, at one decoding budget: the baselines'
    accuracy at that budget, and `report`'s metrics (an undefined one is None, its `*_undefined` says why)."""

    max_new_tokens: int
    k: int
    method: str
    source: float
    source_ci95: Interval
    target: float
    target_ci95: Interval
    accuracy: float
    accuracy_ci95: Interval
    tir: float | None
    tir_ci95: Interval | None
    recovery_pct: float | None
    recovery_ci95: Interval | None
    nll: float | None
    nll_recovery_pct: float | None
    nll_recovery_ci95: Interval | None
    tir_undefined: str | None
    recovery_undefined: str | None
    nll_undefined: str | None
    alpha: float = 1.0
    retention: tuple[Retention, ...] = ()  # one per keep set of the table, in its order


@dataclass(frozen=True)
class SweepTable:
    """What `sweep` measured, on what, and a row per budget, K and ranking (`to_dict` is `sweep.json`).

    Attributes:
        source, target: the checkpoints' folders.
        manifest: the ranking's manifest; `method` its method, the rows' other method the random-K baseline.
        random_seed: the random-K baseline's seed (None without one).
        k, max_new_tokens: the K values and decoding budgets swept.
    """

    benchmark: str
    problems: int
    seed: int
    shots: int
    dtype: str
    source: str
    target: str
    manifest: ManifestRef
    random_seed: int | None
    method: str
    k: tuple[int, ...]
    max_new_tokens: tuple[int, ...]
    rows: tuple[SweepRow, ...]
    alphas: tuple[float, ...] = (1.0,)
    keep: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "k": list(self.k),
            "max_new_tokens": list(self.max_new_tokens),
            "alphas": list(self.alphas),
            "keep": list(self.keep),
            "rows": [asdict(r) for r in self.rows],
        }


def sweep(
    manifest: str | Path,
    benchmark: str,
    out: str | Path,
    *,
    source: str | Path,
    target: str | Path,
    ks: str | None = None,
    max_new_tokens: str = "256",
    limit: int | None = None,
    seed: int = 42,
    shots: int = 0,
    batch_size: int = 16,
    random_seed: int = 0,
    random: bool = True,
    force: bool = False,
    alphas: str | None = None,
    keep: Sequence[str] = (),
    options: ModelOptions | None = None,
) -> SweepTable:
    """Evaluate source, target, and the target patched with the top-K (and random-K) modules.

    Args:
        manifest: the ranking to take the top K from.
        benchmark: as in `evaluate`.
        out: folder for every evaluation, the table (sweep.md, sweep.json) and the plot (sweep.png).
        source, target: checkpoint folders.
        ks: comma-separated K values, e.g. "8,16,32"; None for `k_grid.DEFAULT_KS` from `SWEEP_SMALLEST_K`,
            clipped to the manifest's modules.
        max_new_tokens: comma-separated decoding budgets, e.g. "64,128".
        limit, seed, shots, batch_size: as in `evaluate`.
        random_seed: seed of the random-K baseline.
        random: also evaluate the random-K baseline at every K (one more evaluation per K and budget).
        force: accept a manifest made for other checkpoints (with a warning).
        alphas: comma-separated blends, e.g. "0.25,0.5,1": each K is evaluated at each alpha (`transplant --alpha`);
            None for 1 alone (a copy).
        keep: keep sets (as `eval --keep` takes them): each model's keep NLL on them is measured into its folder,
            and each row gets its Retention on each (`metrics.retention`).
        options: how the models are loaded and prompted (no `max_memory`: swapping weights in place needs
            them all in memory); default `ModelOptions()`.

    Returns:
        The table (also in sweep.json, sweep.md and sweep.png).

    Raises:
        SurgeryError: bad K values or budgets, a manifest for other checkpoints (without `force`), or a bad
            benchmark or checkpoint.
    """
    options = options or ModelOptions()
    budgets = parse_ints(max_new_tokens, "--max-new-tokens")
    blends = parse_alphas(alphas)
    workloads = keep_sets(keep)
    tgt, src = open_checkpoint(target), open_checkpoint(source)
    man = load_manifest(manifest)
    check_ranked_for(man, src, tgt, force, path=manifest)
    k_values = parse_ks(ks, len(man.modules), SWEEP_SMALLEST_K)
    if ks is None and max(default_grid(SWEEP_SMALLEST_K)) > len(man.modules):
        # The default grid is clipped to the manifest's modules (and includes all of them), and says so.
        print(f"note: the manifest ranks {len(man.modules)} modules; K = {k_values}", file=sys.stderr)
    compat = find_candidates(src, tgt, options.trust_remote_code)
    rankings = [(man.method.name, man.modules)]
    if random:
        chance = baseline_method().name  # `random`: the registry's declared baseline
        rankings.append((chance, build_manifest(chance, compat, source=src, target=tgt, seed=random_seed).modules))
    bench, problems = prepare(benchmark, limit, seed, shots)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def run(lm, tokenizer, label: str, fingerprint: str, budget: int) -> None:
        folder = out / f"{label}-m{budget}"
        settings = eval_settings(
            lm,
            tokenizer,
            bench,
            problems,
            limit=limit,
            seed=seed,
            shots=shots,
            chat=options.chat,
            max_new_tokens=budget,
            fingerprint=fingerprint,
        )
        golds = [(w, encode_gold(tokenizer, w, options.chat)) for w in workloads]
        todo = keep_pending(folder, golds, settings)
        evaluate_loaded(lm, tokenizer, bench, problems, settings, folder, label, batch_size, options.progress)
        measure_keep(lm, folder, todo, settings)

    def on_source(lm) -> None:
        for budget in budgets:
            run(lm, src_tokenizer, "source", src.fingerprint, budget)

    def on_target(lm) -> None:
        for budget in budgets:
            run(lm, tgt_tokenizer, "target", tgt.fingerprint, budget)
            for k in k_values:
                for method, ranking in rankings:
                    chosen = [t for m in select_modules(ranking, top_k=k) for t in m.tensors]
                    for alpha in blends:
                        # The fingerprint of the checkpoint `transplant` would write: its card can carry this.
                        fingerprint = output_fingerprint(tgt, src, chosen, alpha=alpha)
                        with swapped(lm, src, chosen, alpha=alpha):
                            run(lm, tgt_tokenizer, label(method, k, alpha), fingerprint, budget)

    # One model in memory at a time: the source, then the target with each selection swapped in.
    src_tokenizer = load_tokenizer(src.path, options.trust_remote_code)
    with_model(src.path, options, on_source)
    tgt_tokenizer = load_tokenizer(tgt.path, options.trust_remote_code)
    with_model(tgt.path, options, on_target)

    methods = [name for name, _ in rankings]
    table = SweepTable(
        bench.name,
        len(problems),
        seed,
        shots,
        options.dtype,
        str(src.path),
        str(tgt.path),
        ManifestRef(str(manifest), file_sha256(manifest), man.method.name),
        random_seed if random else None,
        methods[0],
        tuple(k_values),
        tuple(budgets),
        _rows(out, methods, k_values, budgets, blends, keep),
        tuple(blends),
        tuple(keep),
    )
    if dist_info()[0] == 0:  # under torchrun every rank has the table; one writes it
        write_json_atomic(out / "sweep.json", table.to_dict())
        write_atomic(out / "sweep.md", markdown(table).encode("utf-8"))
        _plot(table, out / "sweep.png")
    return table


# The metrics a sweep row takes from `report`'s row.
_REPORTED = (
    *("accuracy", "accuracy_ci95", "tir", "tir_ci95", "recovery_pct", "recovery_ci95"),
    *("nll", "nll_recovery_pct", "nll_recovery_ci95", "tir_undefined", "recovery_undefined", "nll_undefined"),
)


def label(method: str, k: int, alpha: float) -> str:
    """A patched model's name in a sweep folder: `taylor-k16`, or blended `taylor-k16-a0.5`."""
    return f"{method}-k{k}" + (f"-a{alpha:g}" if alpha != 1 else "")


def _rows(
    out: Path, methods: list[str], k_values: list[int], budgets: list[int], alphas: list[float], keep: Sequence[str]
) -> tuple[SweepRow, ...]:
    rows = []
    for budget in budgets:
        for k in k_values:
            names = [(m, a) for m in methods for a in alphas]
            folders = [out / f"{label(m, k, a)}-m{budget}" for m, a in names]
            source, target = out / f"source-m{budget}", out / f"target-m{budget}"
            r = report(source, target, folders)
            kept = [report(source, target, folders, keep=spec).rows for spec in keep]
            for i, (row, (m, a)) in enumerate(zip(r.rows, names, strict=True)):
                s, t = r.source, r.target
                reported = {x: getattr(row, x) for x in _REPORTED}
                retained = tuple(k_rows[i].retention for k_rows in kept)
                rows.append(
                    SweepRow(
                        budget, k, m, s.accuracy, s.accuracy_ci95, t.accuracy, t.accuracy_ci95, **reported,
                        alpha=a, retention=retained,  # type: ignore[arg-type]  (report --keep sets every row's)
                    )
                )  # fmt: skip
    return tuple(rows)


def markdown(table: SweepTable) -> str:
    """The sweep as a table that stands on its own: what was measured, on what, and every value's interval."""

    def num(x: float | None, ci: Interval | None, fmt: str, scale: float = 1) -> str:
        if x is None:
            return "undefined"
        band = f" [{format(scale * ci[0], fmt)}, {format(scale * ci[1], fmt)}]" if ci else ""
        return format(scale * x, fmt) + band

    m = table.manifest
    blended = table.alphas != (1.0,)
    lines = [
        f"{table.benchmark}, {table.problems} problems (seed {table.seed}, {table.shots}-shot, "
        f"{table.dtype}); source {table.source}, target {table.target}; ranking `{m.method}` from "
        f"{m.path} (sha256 {m.sha256[:12]}…), "
        + ("no random-K baseline" if table.random_seed is None else f"random-K seed {table.random_seed}")
        + ". 95% intervals: "
        "Wilson for accuracy, paired bootstrap for TIR, Recovery and Retention.",
        "",
        "| max_new_tokens | K | "
        + ("alpha | " if blended else "")
        + "method | source | target | patched | TIR | Recovery % | gold NLL | NLL Recovery % |"
        + "".join(f" keep {w} |" for w in table.keep),
        "|---" * (10 + blended + len(table.keep)) + "|",
    ]
    for r in table.rows:
        lines.append(
            f"| {r.max_new_tokens} | {r.k} | "
            + (f"{r.alpha:g} | " if blended else "")
            + f"{r.method} | {100 * r.source:.1f}% | {100 * r.target:.1f}% "
            f"| {num(r.accuracy, r.accuracy_ci95, '.1f', 100)}% | {num(r.tir, r.tir_ci95, '.2f')} "
            f"| {num(r.recovery_pct, r.recovery_ci95, '.1f')} | {num(r.nll, None, '.4f')} "
            f"| {num(r.nll_recovery_pct, r.nll_recovery_ci95, '.1f')} |"
            + "".join(f" {describe(x)} |" for x in r.retention)
        )
    return "\n".join(lines) + "\n"


def _plot(table: SweepTable, path: Path) -> None:
    """Accuracy, TIR, Recovery, gold-NLL Recovery (and with keep sets, Retention on the first) against K, with 95%
    bands: a line per max_new_tokens and alpha, random-K dashed; the x-axis at the swept K; a panel with no
    defined value says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def field(key: str, ci: str, scale: float) -> Callable[[SweepRow], tuple[float, Interval | None] | None]:
        def value(r: SweepRow) -> tuple[float, Interval | None] | None:
            v = getattr(r, key)
            c = getattr(r, ci)
            return None if v is None else (scale * v, (scale * c[0], scale * c[1]) if c else None)

        return value

    def kept(r: SweepRow) -> tuple[float, Interval | None] | None:
        first = r.retention[0]
        return None if first.pct is None else (first.pct, first.ci95)

    panels = [
        ("accuracy %", field("accuracy", "accuracy_ci95", 100), None),
        ("TIR (patched / target)", field("tir", "tir_ci95", 1), "tir_undefined"),
        ("Recovery %", field("recovery_pct", "recovery_ci95", 1), "recovery_undefined"),
        ("gold-NLL Recovery %", field("nll_recovery_pct", "nll_recovery_ci95", 1), "nll_undefined"),
    ]
    if table.keep:
        panels.append((f"Retention % on {table.keep[0]}", kept, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.8))
    for budget in table.max_new_tokens:
        for alpha in table.alphas:
            for method, style in ((table.method, "-o"), (baseline_method().name, "--x")):
                rows = [r for r in table.rows if (r.max_new_tokens, r.method, r.alpha) == (budget, method, alpha)]
                label = f"{method}, {budget} tok" + (f", alpha {alpha:g}" if len(table.alphas) > 1 else "")
                for ax, (_, value, _) in zip(axes, panels, strict=True):
                    pts = [(r.k, *v) for r in rows if (v := value(r)) is not None]
                    if not pts:
                        continue
                    (line,) = ax.plot([k for k, _, _ in pts], [v for _, v, _ in pts], style, label=label)
                    band = [(k, c[0], c[1]) for k, _, c in pts if c]
                    if band:
                        ks, lo, hi = zip(*band, strict=True)
                        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.12, lw=0)
        first = next(r for r in table.rows if r.max_new_tokens == budget)
        axes[0].axhline(100 * first.source, color="green", lw=0.8, ls=":", label=f"source, {budget} tok")
        axes[0].axhline(100 * first.target, color="red", lw=0.8, ls=":", label=f"target, {budget} tok")
    for ax, (title, value, reason) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(table.k, [str(k) for k in table.k])
        ax.minorticks_off()
        ax.set_xlabel("K (modules transplanted)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if all(value(r) is None for r in table.rows):
            why = getattr(table.rows[0], reason) if reason else table.rows[0].retention[0].undefined
            ax.text(0.5, 0.5, f"undefined\n({why})", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes[0].set_ylim(bottom=0, top=max(5.0, axes[0].get_ylim()[1]))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
