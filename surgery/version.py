"""The package version, in a module of its own so that every layer can record it without importing `surgery`."""

__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    """surgery, torch and transformers versions, as recorded in stats files and eval summaries."""
    import torch
    import transformers

    return {"surgery": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
