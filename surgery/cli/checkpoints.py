"""`inspect` and `compat`: describe a checkpoint, and list what can move between two."""

from __future__ import annotations

import json

import click

from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import open_checkpoint
from surgery.cli.options import AS_JSON, TRUST_REMOTE_CODE
from surgery.errors import SurgeryError


@click.command()
@click.argument("path", type=click.Path(path_type=str))
@AS_JSON
def inspect(path: str, as_json: bool) -> None:
    """Describe the checkpoint PATH (a folder, or a Hub repo id org/name[@revision]) after validating its headers;
    or the patch folder PATH (`transplant --patch`)."""
    from surgery.transplants.patch import is_patch, open_patch

    # A patch's headers are validated as a checkpoint's are; its bytes are hashed when it is applied.
    info = (
        open_patch(path, check_digests=False, originals=False).summary()
        if is_patch(path)
        else open_checkpoint(path).summary()
    )
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(16, *(len(key) + 1 for key in info))
    for key, value in info.items():
        if key == "total_bytes":
            value = f"{value} ({value / 2**30:.2f} GiB)"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        click.echo(f"{key:{width}} {value}")


@click.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str), metavar="[SOURCE TARGET]")
@click.option("--source", "-s", help="Checkpoint modules are taken from (as in every other command).")
@click.option("--target", "-t", help="Checkpoint they are written into.")
@AS_JSON
@TRUST_REMOTE_CODE
def compat(
    checkpoints: tuple[str, ...], source: str | None, target: str | None, as_json: bool, trust_remote_code: bool
) -> None:
    """List the modules that can move from the source to the target (folders or Hub repo ids), and why others
    cannot. Name them with -s/-t, as every other command does, or as SOURCE TARGET."""
    if checkpoints and (source or target):
        raise SurgeryError("name the checkpoints either as SOURCE TARGET or with -s/-t, not both")
    if checkpoints:
        if len(checkpoints) != 2:
            raise SurgeryError(f"compat takes two checkpoints, SOURCE TARGET, not {len(checkpoints)}; or use -s/-t")
        source, target = checkpoints
    if not source or not target:
        raise SurgeryError("compat needs both checkpoints: surgery compat -s SOURCE -t TARGET")
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
    for c in result.candidates:
        click.echo(f"  candidate {c.name} ({c.kind}, {'x'.join(map(str, c.shape))})")
    for e in result.excluded:
        click.echo(f"  excluded {e.name}: {e.reason}")
    if not result.candidates:
        raise SurgeryError("no transplantable modules; the checkpoints share no nn.Linear of equal name and shape")
