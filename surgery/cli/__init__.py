"""The `surgery` command line: a thin layer over the Python API, one module of commands per stage.

Each command parses its flags, calls one library function and prints a line. Flags used by
several commands are declared once in `options.py`.
"""

from __future__ import annotations

import click

from surgery.cli import analysis, checkpoints, demo, evaluation, importers, transplants
from surgery.errors import SurgeryError
from surgery.transplants.verify import VerificationError


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


# In pipeline order: checkpoints in, analysis, transplant, evaluation, then the demo of all of them.
for command in (
    checkpoints.inspect,
    importers.import_gguf_cmd,
    importers.import_pickle_cmd,
    checkpoints.compat,
    transplants.transplant,
    transplants.apply_cmd,
    transplants.verify,
    transplants.push_cmd,
    analysis.profile_cmd,
    analysis.manifest_cmd,
    analysis.analyze_cmd,
    evaluation.eval_cmd,
    evaluation.solutions_cmd,
    evaluation.report_cmd,
    evaluation.sweep_cmd,
    evaluation.select_cmd,
    demo.demo_cmd,
):
    main.add_command(command)
