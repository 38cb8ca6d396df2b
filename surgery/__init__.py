"""surgery: transplant modules between Hugging Face checkpoints, offline and without training.

The public Python API; the `surgery` CLI is a thin layer over these functions.
"""

__version__ = "0.1.0"

from surgery.checkpoint import Checkpoint, open_checkpoint
from surgery.errors import SurgeryError
from surgery.manifest import Manifest, load_manifest, save_manifest, select_modules
from surgery.modules import Candidate, Compatibility, find_candidates
from surgery.transplant import TransplantResult, transplant
from surgery.verify import VerificationError, verify

# The analysis API needs torch; it is imported on first use so that `import surgery` (and
# `transplant`/`verify`, which only move bytes) stay free of it.
_LAZY = {
    "analyze": "surgery.analysis",
    "profile": "surgery.profiling",
    "build_manifest": "surgery.ranking",
    "import_gguf": "surgery.gguf_import",
    "load_stats": "surgery.stats",
    "load_workload": "surgery.workloads",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "Candidate",
    "Checkpoint",
    "Compatibility",
    "Manifest",
    "SurgeryError",
    "TransplantResult",
    "VerificationError",
    "__version__",
    "analyze",
    "build_manifest",
    "find_candidates",
    "import_gguf",
    "load_manifest",
    "load_stats",
    "load_workload",
    "open_checkpoint",
    "profile",
    "save_manifest",
    "select_modules",
    "transplant",
    "verify",
]
