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

__all__ = [
    "Candidate",
    "Checkpoint",
    "Compatibility",
    "Manifest",
    "SurgeryError",
    "TransplantResult",
    "VerificationError",
    "__version__",
    "find_candidates",
    "load_manifest",
    "open_checkpoint",
    "save_manifest",
    "select_modules",
    "transplant",
    "verify",
]
