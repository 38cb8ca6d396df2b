"""Convert a GGUF file into a Hugging Face safetensors checkpoint folder.

transformers reads GGUF (`from_pretrained(dir, gguf_file=name)`; most architectures through the `gguf` package):
it de-quantises every tensor and undoes llama.cpp's Q/K row permutation. It then refuses to
`save_pretrained` the result, because the model keeps the GGUF quantizer it was loaded with
and that quantizer is not serialisable. So the weights are moved into a plain model of the same
class, built from the same config without its `quantization_config`, and that one is saved.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The package's one staging and atomic-publish path, shared with transplant.
from surgery.checkpoints.staging import check_out, staged_folder
from surgery.errors import SurgeryError

DTYPES = ("float32", "bfloat16", "float16")
_MAGIC = b"GGUF"


def import_gguf(
    gguf_file: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a GGUF file's model as a safetensors checkpoint folder with config, generation config and tokenizer.

    Quantised tensors are de-quantised, then stored in `dtype`. A tied head stays tied (stored once,
    as the embedding). The folder is written beside `out` under a temporary name, fsynced, and
    renamed into place, so an interrupted run never leaves a complete-looking `out`.

    Args:
        gguf_file: the `.gguf` file; one of the architectures transformers reads from GGUF.
        out: the output folder; must not exist unless `overwrite`.
        dtype: the stored dtype: `float32`, `bfloat16` or `float16`.
        overwrite: replace an existing `out`, only once the new one is complete.
        progress: transformers' bars (de-quantizing, writing) on a terminal; False: none (`-q`).

    Returns:
        The output folder, resolved.

    Raises:
        SurgeryError: `gguf_file` is missing, not a GGUF, corrupt, or of an unsupported architecture;
            the `gguf` package is not installed; `dtype` is not one of the above; `out` exists
            without `overwrite`, or cannot be written. Nothing is written in any of these cases.
    """
    if dtype not in DTYPES:
        raise SurgeryError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    src = Path(gguf_file)
    architecture = _check_gguf(src)
    # As an input, the GGUF file must not end up inside OUT: --overwrite would delete it.
    out = check_out(Path(out), {"GGUF file": src.resolve()}, overwrite)

    import torch

    with _bars(progress):
        model, tokenizer = _load(src, architecture, getattr(torch, dtype))
        with staged_folder(out, overwrite, sum(t.nbytes for t in model.state_dict().values())) as tmp:
            model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes
            tokenizer.save_pretrained(tmp)
    return out


@contextmanager
def _bars(progress: bool) -> Iterator[None]:
    """transformers' bars on a terminal only, and not with `progress` off (`transformers_bars`), its GGUF
    converter's included.

    The converter draws its "Converting and de-quantizing GGUF tensors" bar with tqdm directly, past
    transformers' switch; for the import it gets transformers' own tqdm, which obeys the switch and
    is that same tqdm on a terminal.
    """
    from transformers import modeling_gguf_pytorch_utils as converter
    from transformers.utils import logging as hf_logging

    from surgery.checkpoints.loading import transformers_bars

    own = converter.tqdm
    converter.tqdm = hf_logging.tqdm
    try:
        with transformers_bars(progress=progress):
            yield
    finally:
        converter.tqdm = own


def supported_architectures() -> list[str]:
    """The GGUF architectures this transformers can load, as transformers names them."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The legacy table's keys are config sections; `general` and `tokenizer` are not architectures.
    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:  # newer transformers read some architectures with their own GGUF reader
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        names |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _check_gguf(path: Path) -> str:
    """Refuse a missing, non-GGUF or corrupt file before anything slow; return its `general.architecture`."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise SurgeryError(f"{path} {what}; pass the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_MAGIC))
    except OSError as e:
        raise SurgeryError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if magic != _MAGIC:
        raise SurgeryError(f"{path} is not a GGUF file (it does not start with b'GGUF'); pass a .gguf model file")
    if importlib.util.find_spec("gguf") is None:
        raise SurgeryError("reading GGUF needs the gguf package (transformers reads GGUF through it); pip install gguf")
    from gguf import GGUFReader

    # The reader walks every metadata field and maps every tensor's bytes: a truncated or damaged
    # file fails here (as a numpy or struct error) instead of half-way through the conversion.
    try:
        field = GGUFReader(path).fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as e:
        raise SurgeryError(
            f"{path} is a corrupt or truncated GGUF ({_one_line(e)}); re-download or re-export it"
        ) from None
    if not isinstance(architecture, str):
        raise SurgeryError(f"{path} has no general.architecture in its metadata; re-export it with llama.cpp")
    return architecture


def _load(src: Path, architecture: str, dtype):
    """The GGUF's model as a plain (serialisable) model in `dtype`, and its tokenizer."""
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # The GGUF is a local file: never ask the Hub for anything.
    where = {"pretrained_model_name_or_path": src.parent, "gguf_file": src.name, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(**where)
    except (ValueError, KeyError) as e:
        # GGUF spells some names differently from transformers' list (qwen2moe, gpt-oss vs qwen2_moe, gpt_oss).
        if _bare(architecture) not in {_bare(a) for a in supported_architectures()}:
            raise SurgeryError(
                f"{src}: GGUF architecture {architecture!r} is not supported by transformers; "
                f"supported: {', '.join(supported_architectures())}"
            ) from None
        raise SurgeryError(
            f"{src}: transformers cannot build a config from it ({_one_line(e)}); re-export it"
        ) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise SurgeryError(f"{src} holds a {config.model_type} model, not a causal LM; import-gguf converts causal LMs")

    # The tokenizer first: it is cheaper, and a GGUF without tokenizer metadata should fail fast.
    # Without local_files_only: the tokenizer writes its load kwargs into tokenizer_config.json, and
    # a local folder is never looked up on the Hub anyway.
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except (ValueError, KeyError) as e:
        raise SurgeryError(
            f"{src}: transformers cannot build its tokenizer ({_one_line(e)}); "
            "the GGUF needs tokenizer.ggml.* metadata, re-export it with llama.cpp"
        ) from None
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=dtype, **_dequantize())
    except (ValueError, KeyError, RuntimeError) as e:
        raise SurgeryError(f"{src}: transformers cannot load its weights ({_one_line(e)}); re-export it") from None

    # A GGUF config carries neither `quantization_config` (from_pretrained adds it to the model's copy)
    # nor `architectures`; the saved folder must have the second and not the first.
    config.architectures = [type(gguf_model).__name__]
    # Built on the meta device, so no memory is allocated and nothing is randomly initialised:
    # assign=True makes the GGUF model's (already de-quantised) tensors the plain model's own.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    # assign=True gives a tied head and the embedding separate Parameters over one storage; tie them
    # again so the model is what from_config built (save_pretrained stores the shared tensor once).
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model, tokenizer


def _bare(name: str) -> str:
    return name.replace("-", "").replace("_", "")


def _one_line(e: BaseException) -> str:
    """transformers' messages can span lines; ours are one."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def _dequantize() -> dict:
    """Ask for plain dense weights where transformers could otherwise keep GGUF blocks packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
