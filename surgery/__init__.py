"""surgery: transplant modules between Hugging Face checkpoints, offline and without training.

The public Python API; the `surgery` CLI is a thin layer over these functions.
"""

from surgery.checkpoints.candidates import Candidate, Compatibility, find_candidates
from surgery.checkpoints.folder import Checkpoint, open_checkpoint
from surgery.checkpoints.options import ModelOptions
from surgery.errors import SurgeryError
from surgery.manifest import Manifest, load_manifest, save_manifest, select_modules
from surgery.transplants.apply import AppliedPatch, apply, apply_patch
from surgery.transplants.patch import Patch, PatchResult, open_patch, write_patch
from surgery.transplants.verify import VerificationError, verify
from surgery.transplants.write import TransplantResult, transplant
from surgery.version import __version__

# The analysis and evaluation API needs torch (and `push` huggingface_hub's upload client); each
# is imported on first use so that `import surgery` (and `transplant`/`verify`, which only move
# bytes) stay free of it.
_LAZY = {
    "analyze": "surgery.analysis.analyze",
    "analyze_and_select": "surgery.evaluation.analyze_select",
    "profile": "surgery.analysis.profiling",
    "build_manifest": "surgery.analysis.ranking",
    "rank": "surgery.analysis.rank",
    "import_gguf": "surgery.importers.from_gguf",
    "load_stats": "surgery.analysis.stats",
    "load_workload": "surgery.analysis.workloads",
    "evaluate": "surgery.evaluation.runner",
    "choose_k": "surgery.evaluation.select",
    "solutions": "surgery.evaluation.solutions",
    "source_solutions": "surgery.evaluation.solutions",
    "SolutionsResult": "surgery.evaluation.solutions",
    "sweep": "surgery.evaluation.sweep",
    "report": "surgery.evaluation.report",
    "keep_nll": "surgery.evaluation.keep",
    "retention": "surgery.evaluation.metrics",
    "Retention": "surgery.evaluation.metrics",
    "measure_patched": "surgery.evaluation.tradeoff",
    "Patched": "surgery.evaluation.tradeoff",
    "push": "surgery.hub.publish",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "AppliedPatch",
    "Candidate",
    "Checkpoint",
    "Compatibility",
    "Manifest",
    "ModelOptions",
    "Patch",
    "PatchResult",
    "Patched",
    "Retention",
    "SolutionsResult",
    "SurgeryError",
    "TransplantResult",
    "VerificationError",
    "__version__",
    "analyze",
    "analyze_and_select",
    "apply",
    "apply_patch",
    "build_manifest",
    "choose_k",
    "evaluate",
    "find_candidates",
    "import_gguf",
    "keep_nll",
    "load_manifest",
    "load_stats",
    "load_workload",
    "measure_patched",
    "open_checkpoint",
    "open_patch",
    "profile",
    "push",
    "rank",
    "report",
    "retention",
    "save_manifest",
    "select_modules",
    "solutions",
    "source_solutions",
    "sweep",
    "transplant",
    "verify",
    "write_patch",
]
