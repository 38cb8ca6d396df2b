"""Load one model and its tokenizer for inference (profile, eval), offline.

With `max_memory`, loading goes through accelerate's big-model inference: transformers'
`device_map="auto"` places what fits in the budget and leaves the rest on "disk", read in
place from the checkpoint's safetensors files, so a model larger than RAM still runs.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from surgery.checkpoints.options import DEVICES, ModelOptions
from surgery.errors import SurgeryError, one_line

_DTYPES = {"auto": "auto", "fast": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU flags of native bfloat16 matmuls (Linux /proc/cpuinfo names).
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
T = TypeVar("T")


def native_bf16() -> bool:
    """Whether bfloat16 runs natively here: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX-BF16.

    Without them torch emulates bfloat16 on the CPU, several times slower than float32: seen on an
    AVX2-only AMD EPYC, where one bf16 fine-tune step of a 1.5B model did not finish in 9 minutes.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return any(f in flags for f in _BF16_FLAGS)


def resolve_dtype(dtype: str):
    """The torch dtype (or `"auto"`) a `--dtype` value loads with; `fast` is decided by `native_bf16`."""
    if dtype not in _DTYPES:
        raise SurgeryError(f"--dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    if dtype == "fast":
        return torch.bfloat16 if native_bf16() else torch.float32
    return _DTYPES[dtype]


def parse_memory(text: str) -> int:
    """Parse a memory budget such as `2GiB`, `500MB` or `1073741824` into bytes (accelerate's parser).

    Raises:
        SurgeryError: the text is not a positive size.
    """
    from accelerate.utils import convert_file_size_to_int

    try:
        size = int(text) if text.strip().isdigit() else convert_file_size_to_int(text.strip())
    except ValueError:
        size = 0
    if size <= 0:
        raise SurgeryError(f"--max-memory {text!r} is not a size; use e.g. 2GiB, 1500MB or a byte count")
    return size


def check_generation_options(
    max_new_tokens: int, batch_size: int, max_memory: str | None, device: str = "auto"
) -> None:
    """Refuse bad decoding options before anything slow starts (shared by profile, analyze, eval)."""
    check_device(device)
    if max_new_tokens <= 0:
        raise SurgeryError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    if batch_size <= 0:
        raise SurgeryError(f"--batch-size must be a positive integer, got {batch_size}")
    if max_memory is not None:
        parse_memory(max_memory)


def check_device(device: str) -> None:
    """Refuse a device that is unknown, or `cuda` where torch sees no GPU."""
    if device not in DEVICES:
        raise SurgeryError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("--device cuda, but torch sees no CUDA GPU here; use --device cpu (or auto)")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, set up for batched generation (left padding, a pad token)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers, jinja2 and transformers raise many types; all mean unreadable files
        raise SurgeryError(
            f"{path}: cannot load its tokenizer offline ({one_line(e)}); the folder needs tokenizer files"
        ) from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SurgeryError(f"{path}: the tokenizer has neither a pad nor an eos token; add one to its config")
        tok.pad_token = tok.eos_token
    return tok


def with_model(path: Path, options: ModelOptions, work: Callable[[Any], T], *, max_memory: str | None = None) -> T:
    """Load the model at `path` (see `load_model`), run `work(model)`, then free the model before returning.

    The one way surgery's commands load a model: one model in memory at a time (`analyze` profiles the
    source, then the target; `select` and `sweep` measure the source, then the target), and with
    `max_memory`, a temporary offload folder, removed afterwards.

    Args:
        path: a validated checkpoint folder.
        options: dtype, device, trust_remote_code, progress.
        work: what to do with the loaded model; its result is returned.
        max_memory: a RAM budget (see `parse_memory`); weights that do not fit stay on disk.

    Returns:
        What `work` returned.

    Raises:
        SurgeryError: as `load_model`.
    """
    with tempfile.TemporaryDirectory(prefix="surgery-offload-") as offload:
        model = load_model(path, options, max_memory=max_memory, offload_dir=Path(offload))
        try:
            return work(model)
        finally:
            # `work` has returned, so this is the last reference: the model is freed before the next one loads.
            del model
            gc.collect()


def load_model(
    path: Path, options: ModelOptions | None = None, *, max_memory: str | None = None, offload_dir: Path | None = None
):
    """Load a causal LM for inference, on the GPU if there is one (unless `options.device` says otherwise).

    Args:
        path: a validated checkpoint folder.
        options: `dtype`: `auto` (the checkpoint's), `fast` (see `native_bf16`), `float32`, `bfloat16` or
            `float16`; `device`: `auto` (the first CUDA GPU when torch sees one, else the CPU), `cpu` or `cuda`
            (refused when torch sees no GPU); `trust_remote_code`: allow custom model code; `progress`: False
            silences transformers' own bars ("Loading weights") for this load (`-q`); they are silent in a log
            (stderr not a terminal) too. Default `ModelOptions()`.
        max_memory: a RAM budget (see `parse_memory`); weights that do not fit stay on disk. Also
            tunes glibc's malloc for the whole process so freed weights leave the resident set. With it,
            `auto`/`cuda` spread the model over the GPUs, the CPU and the disk (accelerate's
            `device_map="auto"`); `cpu` over the CPU and the disk.
        offload_dir: where accelerate may re-save weights it cannot read in place (safetensors
            weights are read in place and need none).

    Returns:
        The model, in eval mode.
    """
    from transformers import AutoModelForCausalLM

    options = options or ModelOptions()
    device = options.device
    check_device(device)
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    kwargs: dict = {
        "dtype": resolve_dtype(options.dtype),
        "local_files_only": True,
        "trust_remote_code": options.trust_remote_code,
    }
    if max_memory is not None:
        _return_large_frees_to_os()
        budget = parse_memory(max_memory)
        kwargs |= {
            "device_map": "auto",
            "max_memory": {**dict.fromkeys(range(gpus), budget), "cpu": budget},
            "offload_folder": str(offload_dir) if offload_dir else None,
        }
    elif gpus:
        kwargs["device_map"] = "cuda"
    try:
        with transformers_bars(options.progress):
            return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    except MemoryError:
        raise
    except Exception as e:  # a config or weights transformers refuses (validated configs raise many types)
        raise SurgeryError(f"{path}: transformers cannot load this model ({one_line(e)}); check config.json") from None


@contextmanager
def transformers_bars(progress: bool) -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") only where they belong.

    They redraw with carriage returns: fine on a terminal, noise in a log. So they are on only when
    `progress` (no `-q`) and stderr is a terminal, and as they were afterwards.
    """
    from transformers.utils import logging as hf_logging

    quiet = not progress or not sys.stderr.isatty()
    bars = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars and quiet:
            hf_logging.enable_progress_bar()


def chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """Render `messages` with the tokenizer's chat template, ready for generation.

    The template runs in jinja's sandbox, as transformers sets it up; a template that fails or
    escapes is refused in one line, not crashed on.

    Raises:
        SurgeryError: the template cannot render these messages.
    """
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2's sandbox and template errors, or transformers' own
        raise SurgeryError(
            f"{tokenizer.name_or_path}: its chat template fails to render ({one_line(e)}); fix it or pass --no-chat"
        ) from None


def _return_large_frees_to_os() -> None:
    """Make glibc give freed blocks over 1 MiB back to the OS (as MALLOC_MMAP_THRESHOLD_=1048576 would).

    With offloading, every offloaded layer's weights are allocated and freed again on each forward
    pass. glibc's adaptive threshold then serves them from the heap and keeps the freed memory for
    reuse, so the resident set grows far past the budget (measured: 1234 MiB under a 512 MiB budget).
    Process-wide, and a no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 20)


def input_device(model) -> torch.device:
    """Where inputs go: the device of the input embeddings (the first GPU under a device map)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device
