"""`transplant`, `apply`, `verify` and `push`: write a patched checkpoint (or a patch), apply a patch, check
an output byte for byte, publish it."""

from __future__ import annotations

import click

from surgery.cli.options import OUT_FOLDER, OVERWRITE, QUIET, TRUST_REMOTE_CODE, size
from surgery.errors import SurgeryError
from surgery.manifest import parse_layer_range
from surgery.transplants.command import transplant_output
from surgery.transplants.patch import PatchResult
from surgery.transplants.plan import WritePlan
from surgery.transplants.verify import verify as run_verify
from surgery.transplants.write import TransplantResult


@click.command()
@click.option("--target", "-t", required=True, help="Checkpoint to patch: folder or org/name[@rev] (never modified).")
@click.option("--source", "-s", required=True, help="Checkpoint to take modules from: folder or org/name[@rev].")
@OUT_FOLDER
@click.option("--manifest", "-m", help="Module manifest ranking the candidates (format: manifests/schema.json).")
@click.option("--top-k", "-k", type=int, help="Transplant the K best-ranked modules (needs --manifest).")
@click.option("--only", type=click.Choice(["attn", "mlp", "other"]), help="Only modules of this kind.")
@click.option("--layers", help="Only layers in this inclusive range, e.g. 0-11.")
@click.option("--module", "modules", multiple=True, help="Module name or glob pattern; repeatable.")
@click.option("--force", is_flag=True, help="Use a manifest made for other checkpoints (warns).")
@OVERWRITE
@QUIET
@TRUST_REMOTE_CODE
@click.option(
    "--eval-results", multiple=True, help="summary.json of `surgery eval` to report in the model card; repeatable."
)
@click.option(
    "--link", is_flag=True, help="Hard-link the target's shards that no selected module touches (same file, no copy)."
)
@click.option(
    "--patch",
    is_flag=True,
    help="Write only the selected tensors (a patch folder for `surgery apply`), not a checkpoint.",
)
@click.option("--reversible", is_flag=True, help="With --patch: also keep the target's originals, for apply --revert.")
@click.option(
    "--alpha",
    type=float,
    metavar="A",
    help="Blend: write target + A * (source - target) for the selected tensors (float32, rounded to the target's "
    "dtype), 0 < A <= 1; 1 copies them. With --module '*': the WiSE-FT interpolation. [default: the alpha "
    "`surgery select` chose with the manifest's K, else 1]",
)
@click.option("--push-to-hub", "push_to", metavar="ORG/NAME", help="Push the output to this Hub repo once written.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--dry-run", is_flag=True, help="Print the write plan (each file's mode and why); write nothing.")
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
    link: bool,
    patch: bool,
    reversible: bool,
    alpha: float | None,
    push_to: str | None,
    private: bool,
    dry_run: bool,
) -> None:
    """Write a copy of the target with the selected modules taken from the source.

    Select with --manifest M --top-k K (filters: --only, --layers, --module), or by
    name alone with --module PATTERN. The output gets a model card (README.md). With
    --patch, write only the selected tensors, to apply later with `surgery apply`. With
    --alpha A, blend them with the target's instead of copying them.
    """
    if push_to is not None:
        from surgery.hub import check_push_options

        check_push_options(push_to)  # a bad repo id is refused before the output is written
        if dry_run:
            raise SurgeryError("--dry-run writes nothing to push; drop --push-to-hub, or --dry-run")
    elif private:
        raise SurgeryError("--private only applies with --push-to-hub ORG/NAME")
    made = transplant_output(
        target=target,
        source=source,
        out=out,
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
        link=link,
        patch=patch,
        reversible=reversible,
        dry_run=dry_run,
        alpha=alpha,
    )
    click.echo(_said(made))
    if push_to is not None and not isinstance(made, WritePlan):
        from surgery.hub import push

        try:
            url = push(made.out, push_to, private=private)
        except SurgeryError as e:
            retry = f"surgery push {made.out} --repo-id {push_to}" + (" --private" if private else "")
            raise SurgeryError(f"{e} (the output is at {made.out}; retry with `{retry}`)") from None
        click.echo(f"pushed to {url}")


def _said(made: TransplantResult | PatchResult | WritePlan) -> str:
    """The line `transplant` prints: what was written, or the plan of a dry run."""
    if isinstance(made, WritePlan):
        return made.describe()
    if isinstance(made, PatchResult):
        return (
            f"wrote patch {made.out}: {len(made.modules)} modules ({len(made.tensors)} tensors, "
            f"{size(made.bytes_written)}) from the source{_blended(made.alpha)}"
        )
    return (
        f"wrote {made.out}: {len(made.modules)} modules ({len(made.tensors)} tensors, "
        f"{size(made.source_bytes)}) from the source{_blended(made.alpha)}; {size(made.total_bytes)} in "
        f"all{_linked(made)}"
    )


def _blended(alpha: float) -> str:
    """What the line that says what was written adds of a blend (`--alpha`): nothing for a copy."""
    return "" if alpha == 1 else f", blended with the target's at alpha {alpha!r}"


def _linked(result: TransplantResult) -> str:
    """How many shards an output shares with its target (`--link`), for the line that says what was written."""
    return (
        f"; {len(result.linked_shards)} of {result.shards} shards hard-linked to the target"
        if result.linked_shards
        else ""
    )


@click.command("apply")
@click.argument("patch", type=click.Path(path_type=str))
@click.option(
    "--target",
    "-t",
    required=True,
    help="The checkpoint the patch was made for; with --revert, the patched one `apply` wrote (never modified).",
)
@OUT_FOLDER
@click.option("--link", is_flag=True, help="Hard-link the target's shards the patch does not touch (no copy).")
@click.option("--revert", is_flag=True, help="TARGET is a patched checkpoint: write the original back (reversible).")
@click.option(
    "--force",
    is_flag=True,
    help="Apply to a target whose config or untouched tensors differ from the recorded one (warns).",
)
@OVERWRITE
@QUIET
def apply_cmd(
    patch: str, target: str, out: str, link: bool, revert: bool, force: bool, overwrite: bool, quiet: bool
) -> None:
    """Write TARGET with the patch PATCH (from `transplant --patch`) applied, or taken back with --revert."""
    from surgery.transplants.apply import apply

    result = apply(patch, target, out, link=link, revert=revert, force=force, overwrite=overwrite, progress=not quiet)
    done = "reverted" if revert else "patched"
    click.echo(
        f"wrote {result.out}: {done} {len(result.modules)} modules ({len(result.tensors)} tensors, "
        f"{size(result.source_bytes)}{_blended(result.alpha)}); {size(result.total_bytes)} in all{_linked(result)}"
    )


@click.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--target", "-t", help="The target the output was made from [default: the one transplant.json names].")
@click.option("--source", "-s", help="The source the output was made from [default: the one transplant.json names].")
def verify(out: str, target: str | None, source: str | None) -> None:
    """Check every byte of the transplant output OUT against its target and source."""
    report = run_verify(out, target=target, source=source)
    linked = (
        f"; {report.linked_shards} of {report.shards} shards are hard links to the target"
        if report.linked_shards
        else ""
    )
    click.echo(
        f"ok: {report.tensors_checked} tensors, {size(report.bytes_checked)} ({report.from_source} from "
        f"the source{_blended(report.alpha)}), and {report.files_checked} files match{linked}"
    )


@click.command("push")
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
