"""`import-gguf` and `import-pickle`: other weight formats into a safetensors checkpoint folder."""

from __future__ import annotations

import click

from surgery.cli.options import OUT_FOLDER, OVERWRITE, QUIET


@click.command("import-gguf")
@click.argument("gguf_file", metavar="FILE.gguf", type=click.Path(path_type=str))
@OUT_FOLDER
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Dtype of the stored weights (quantised tensors are de-quantised first).",
)
@OVERWRITE
@QUIET
def import_gguf_cmd(gguf_file: str, out: str, dtype: str, overwrite: bool, quiet: bool) -> None:
    """Convert a GGUF file into a safetensors checkpoint folder with config, generation config and tokenizer.

    Any causal LM transformers reads from GGUF (llama, qwen2, ...); a tied head stays tied.
    The folder appears at OUT only once complete.
    """
    # Imported here, like the other model commands: the converter pulls in torch and transformers.
    from surgery.importers.from_gguf import import_gguf

    folder = import_gguf(gguf_file, out, dtype=dtype, overwrite=overwrite, progress=not quiet)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    click.echo(f"wrote {folder}: {dtype} safetensors ({size / 2**20:.1f} MiB), config, generation config, tokenizer")


@click.command("import-pickle")
@click.argument("folder", type=click.Path(path_type=str))
@OUT_FOLDER
@click.option("--allow-pickle", is_flag=True, help="Unpickle the weights, with torch.load(weights_only=True).")
@OVERWRITE
def import_pickle_cmd(folder: str, out: str, allow_pickle: bool, overwrite: bool) -> None:
    """Convert the pickle weights (pytorch_model*.bin) of FOLDER into a safetensors checkpoint folder.

    Unpickling can run code: nothing is read without --allow-pickle, and then only through
    torch.load(weights_only=True), which refuses files holding anything but tensors.
    """
    from surgery.importers.from_pickle import import_pickle

    written = import_pickle(folder, out, allow_pickle=allow_pickle, overwrite=overwrite)
    size = sum(p.stat().st_size for p in written.glob("*.safetensors"))
    click.echo(f"wrote {written}: safetensors ({size / 2**20:.1f} MiB) and the other files of {folder}")
