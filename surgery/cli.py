"""The `surgery` command line: a thin layer over the Python API."""

from __future__ import annotations

import json

import click

from surgery.checkpoint import open_checkpoint
from surgery.errors import SurgeryError
from surgery.manifest import parse_layer_range
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
    """Describe the checkpoint folder PATH after validating every shard header."""
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


@main.command()
@click.argument("source", type=click.Path(path_type=str))
@click.argument("target", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--trust-remote-code", is_flag=True, help="Allow configs that need custom model code.")
def compat(source: str, target: str, as_json: bool, trust_remote_code: bool) -> None:
    """List the modules that can move from SOURCE to TARGET, and why others cannot."""
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
@click.option("--target", "-t", required=True, help="Checkpoint folder to patch (never modified).")
@click.option("--source", "-s", required=True, help="Checkpoint folder to take modules from (never modified).")
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
) -> None:
    """Write a copy of the target with the selected modules taken from the source.

    Select with --manifest M --top-k K (filters: --only, --layers, --module), or by
    name alone with --module PATTERN.
    """
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
    )
    click.echo(
        f"wrote {result.out}: {len(result.modules)} modules ({len(result.tensors)} tensors) from the source, "
        f"{result.bytes_written / 2**20:.1f} MiB"
    )


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
