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


@click.command()
@click.argument("source", type=click.Path(path_type=str))
@click.argument("target", type=click.Path(path_type=str))
@AS_JSON
@TRUST_REMOTE_CODE
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
    for c in result.candidates:
        click.echo(f"  candidate {c.name} ({c.kind}, {'x'.join(map(str, c.shape))})")
    for e in result.excluded:
        click.echo(f"  excluded {e.name}: {e.reason}")
    if not result.candidates:
        raise SurgeryError("no transplantable modules; the checkpoints share no nn.Linear of equal name and shape")
