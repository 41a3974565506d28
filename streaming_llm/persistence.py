"""Saving and restoring sessions: one safetensors file, written atomically, checked on load.

The file holds the cache tensors, the ids the session tracks, and a JSON header (format version,
model identity, sizes, counters, template context, summary, sampler state) plus a SHA-256 of every
tensor, so a truncated, corrupted, foreign or other-model file is refused with a clear
:class:`SessionFileError` and nothing of the caller's current session is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .architectures import describe
from .cache import StreamingCache
from .sampling import SamplingConfig

if TYPE_CHECKING:
    from .memory import HybridMemory
    from .session import StreamingSession

FORMAT = "streaming-llm-session"
VERSION = 1
HEADER_KEY = "streaming_llm"


class SessionFileError(ValueError):
    """A session file cannot be used (corrupt, truncated, foreign, wrong version or other model)."""


def model_identity(model: PreTrainedModel) -> dict[str, object]:
    identity = describe(model.config).identity()
    identity["vocab_size"] = model.config.vocab_size
    identity["hidden_size"] = model.config.hidden_size
    return identity


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def save_session(session: StreamingSession, path: Path) -> Path:
    """Write ``session`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    cache_tensors, counters = session.cache.state()
    tensors = {f"cache.{k}": v.detach().cpu().contiguous() for k, v in cache_tensors.items()}
    tensors["session.window_ids"] = torch.tensor(list(session.window_ids), dtype=torch.int64)
    tensors["session.pending_ids"] = torch.tensor(session.pending_ids, dtype=torch.int64)
    if session.last_logits is not None:
        tensors["session.last_logits"] = session.last_logits.detach().cpu().contiguous()
    if session.sampler.generator is not None:
        tensors["session.rng_state"] = session.sampler.generator.get_state().cpu()
    memory_meta = None
    if hasattr(session.memory, "state"):  # retrieval memory: its index travels inside the session file
        memory_tensors, memory_meta = session.memory.state()
        tensors.update({f"memory.{k}": v.detach().cpu().contiguous() for k, v in memory_tensors.items()})
    header = {
        "format": FORMAT, "version": VERSION, "model": model_identity(session.model), "counters": counters,
        "session": {
            "system_prompt": session.system_prompt, "turns": session.turns, "summary": session.summary,
            "template_context": session.template.context, "sampling": vars(session.sampling),
            "recent_ids": list(session.sampler.recent), "window_capacity": session.window_ids.maxlen,
            "prefill_chunk": session.prefill_chunk,
        },
        "memory": memory_meta,
        "sha256": _digest(tensors),
    }  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={HEADER_KEY: json.dumps(header)})
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_session_file(path: Path, model: PreTrainedModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a session file; return ``(header, tensors)``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"No session file at {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SessionFileError(f"{path} is not a readable session file (truncated or corrupt): {error}") from None
    if HEADER_KEY not in metadata:
        raise SessionFileError(f"{path} is a safetensors file but not a streaming-llm session.")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError:
        raise SessionFileError(f"{path} has a corrupt session header.") from None
    if header.get("format") != FORMAT:
        raise SessionFileError(f"{path} is not a streaming-llm session (format {header.get('format')!r}).")
    if header.get("version") != VERSION:
        raise SessionFileError(
            f"{path} was written in session format version {header.get('version')}; this version reads {VERSION}."
        )
    if header.get("sha256") != _digest(tensors):
        raise SessionFileError(f"{path} is corrupt: its tensors do not match their checksum.")
    expected = model_identity(model)
    if header.get("model") != expected:
        raise SessionFileError(
            f"{path} was made with another model ({header.get('model')}); this model is {expected}. "
            "Load it with the model that created it."
        )
    return header, tensors


def load_session(
    cls: type[StreamingSession], path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    memory: HybridMemory | None = None,
) -> StreamingSession:  # fmt: skip
    """Build a new session from ``path``; raises before anything is built if the file is bad."""
    header, tensors = read_session_file(path, model)
    counters, saved = header["counters"], header["session"]
    device = model.device
    try:
        cache_tensors = {k.removeprefix("cache."): v.to(device) for k, v in tensors.items() if k.startswith("cache.")}
        cache = StreamingCache.from_state(model.config, cache_tensors, counters)
    except (KeyError, ValueError, RuntimeError) as error:
        raise SessionFileError(f"{path} holds an inconsistent cache: {error}") from None
    if header.get("memory"):
        from .retrieval import RetrievalMemory

        saved_memory = {k.removeprefix("memory."): v for k, v in tensors.items() if k.startswith("memory.")}
        try:
            if isinstance(memory, RetrievalMemory):
                memory.load_state(saved_memory)
            else:
                memory = RetrievalMemory.from_state(saved_memory, header["memory"])
        except (ValueError, TypeError) as error:
            raise SessionFileError(f"{path} holds an unusable retrieval index: {error}") from None
    if memory is None and counters["segment_capacity"]:
        from .memory import HybridMemory

        memory = HybridMemory(max_tokens=counters["segment_capacity"])
    session = cls.__new__(cls)
    cls.__init__(
        session, model, tokenizer, None, start_size=counters["start_size"], recent_size=saved["window_capacity"],
        pin_system_prompt=False, sampling=SamplingConfig(**saved["sampling"]), memory=memory,
        prefill_chunk=saved["prefill_chunk"],
    )  # fmt: skip
    session.cache = cache
    session.system_prompt = saved["system_prompt"]
    session.turns, session.summary = saved["turns"], saved["summary"]
    session.template.context = saved["template_context"]
    session.window_ids.extend(tensors["session.window_ids"].tolist())
    session.pending_ids = tensors["session.pending_ids"].tolist()
    session.sampler.recent.extend(saved["recent_ids"])
    if "session.rng_state" in tensors and session.sampler.generator is not None:
        session.sampler.generator.set_state(tensors["session.rng_state"])
    if "session.last_logits" in tensors:
        session.last_logits = tensors["session.last_logits"].to(device)
    return session
