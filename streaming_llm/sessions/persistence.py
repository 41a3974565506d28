"""Session files: one safetensors file, written atomically, checked on read. File I/O only.

What goes into a file is the owner's business (:meth:`StreamingSession.state` gives ``(tensors,
state)``); this module adds a JSON header (format, version, model identity, the state) and a SHA-256
over the header *and* every tensor, writes it atomically, and on reading refuses anything that is
not exactly such a file with a :class:`SessionFileError`: truncated, bit-flipped, edited (even a
same-length edit of a header value), foreign, from another format version, or from another model
(the identity includes a fingerprint of the weights, not only the config).

Temporary files are named ``.<name>.<pid>.<random>.tmp`` beside the target; :func:`remove_stale_temporaries`
deletes those whose writing process is gone (a ``kill -9`` during a save), and every save does so for
its own target.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from ..core.architectures import describe

FORMAT = "streaming-llm-session"
VERSION = 2
HEADER_KEY = "streaming_llm"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
# safetensors' save_file first writes its own ``.tmpXXXXXX`` in the target's folder (Rust's tempfile crate), then
# renames it: a kill -9 in between leaves that one too. It names no process, so only old ones are removed.
_LIBRARY_TEMPORARY = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
LIBRARY_TEMPORARY_AGE_S = 600.0
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SessionFileError(ValueError):
    """A session file cannot be used (corrupt, truncated, edited, foreign, wrong version or other model)."""


def weights_fingerprint(model: PreTrainedModel) -> str:
    """SHA-256 (hex) over the names, shapes, dtypes and bytes of every parameter and buffer.

    Computed once per model object (about a second per 500 MB on CPU) and remembered; a model whose
    weights are changed in place afterwards keeps its first fingerprint.
    """
    if model in _fingerprints:
        return _fingerprints[model]
    sha = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor = tensor.detach()
        sha.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        sha.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    _fingerprints[model] = sha.hexdigest()
    return _fingerprints[model]


def model_identity(model: PreTrainedModel) -> dict[str, object]:
    """What a session file must match to be loaded: architecture, sizes, and the weights' fingerprint."""
    identity = describe(model.config).identity()
    identity["vocab_size"] = model.config.vocab_size
    identity["hidden_size"] = model.config.hidden_size
    identity["weights_sha256"] = weights_fingerprint(model)
    return identity


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256(json.dumps(header, sort_keys=True, allow_nan=False).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        sha.update(f"\x00{name}:{tuple(tensor.shape)}:{tensor.dtype}\x00".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def write_session_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict,
                       model: PreTrainedModel, key: bytes | None = None) -> Path:  # fmt: skip
    """Write ``tensors`` and the JSON-serialisable ``state`` to ``path`` atomically.

    With ``key`` the header also carries an HMAC-SHA256 of the checksum under ``key`` (the server's secret):
    :func:`read_session_file` with that key then refuses a file edited even with its checksum recomputed. Without
    it (:meth:`StreamingSession.save`) the checksum detects accidents (truncation, bit flips, another model),
    not a deliberate edit by someone who can write the file.

    The file appears complete or not at all: a temporary file in the same folder is written, flushed
    to disk and renamed over ``path``. Returns ``path``. Raises ``OSError`` (disk full, no permission);
    the previous file at ``path``, if any, is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    header = {"format": FORMAT, "version": VERSION, "model": model_identity(model), "state": state}
    header["sha256"] = _digest(header, tensors)
    if key is not None:
        header["hmac_sha256"] = hmac.new(key, header["sha256"].encode(), hashlib.sha256).hexdigest()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={HEADER_KEY: json.dumps(header, allow_nan=False)})
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def read_session_file(path: str | os.PathLike, model: PreTrainedModel,
                      key: bytes | None = None) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """Read and check a file written by :func:`write_session_file`; return ``(state, tensors)`` (CPU tensors).

    With ``key`` the file must carry a valid HMAC under it (written with that ``key``); without, an HMAC present
    is not checked (a file from another server: only its checksum is).

    Raises:
        FileNotFoundError: nothing at ``path``.
        SessionFileError: anything else wrong with the file, with what and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No session file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises several types for damaged files
        raise SessionFileError(f"{path} is not a readable session file (truncated or corrupt): {error}") from None
    if HEADER_KEY not in metadata:
        raise SessionFileError(f"{path} is a safetensors file but not a streaming-llm session.")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise SessionFileError(f"{path} has a corrupt session header (not JSON).") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise SessionFileError(f"{path} is not a streaming-llm session (format {found!r}).")
    if header.get("version") != VERSION:
        raise SessionFileError(
            f"{path} was written in session format version {header.get('version')!r}; this version reads {VERSION}. "
            "Start a new session (the old file cannot be converted)."
        )
    claimed = header.pop("sha256", None)
    signature = header.pop("hmac_sha256", None)
    if key is not None:
        expected_mac = hmac.new(key, str(claimed).encode(), hashlib.sha256).hexdigest()
        if not isinstance(signature, str) or not hmac.compare_digest(signature, expected_mac):
            raise SessionFileError(f"{path} was not written by this server (its HMAC is missing or wrong): "
                                   "refused, it may have been edited.")  # fmt: skip
    try:
        actual = _digest(header, tensors)
    except (TypeError, ValueError):
        actual = None
    if claimed != actual:
        raise SessionFileError(f"{path} is corrupt or was edited: its header and tensors do not match their checksum.")
    expected = model_identity(model)
    if header.get("model") != expected:
        raise SessionFileError(
            f"{path} was made with another model ({_short(header.get('model'))}); this model is {_short(expected)}. "
            "Load it with the model (same weights) that created it."
        )
    if not isinstance(header.get("state"), dict):
        raise SessionFileError(f"{path} has no session state in its header.")
    return header["state"], tensors


def server_secret(folder: str | os.PathLike) -> bytes:
    """The HMAC key in ``folder/secret.key`` (32 random bytes), created with mode 0600 when missing.

    Raises:
        OSError: the folder cannot be written, or the file read.
    """
    path = Path(folder) / "secret.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
        f.flush()
        os.fsync(f.fileno())
    return path.read_bytes()


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temporary files left in ``folder`` by saves whose process died (for target ``name``, or all).

    A temporary is stale when the process id in its name is no longer running (or is this process's
    id from an earlier life, which cannot be told apart: only other pids are trusted to be alive).
    Without ``name``, the safetensors library's own temporaries (``.tmpXXXXXX``) older than
    ``LIBRARY_TEMPORARY_AGE_S`` (10 minutes: no save takes that long) go too. Returns the files removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for candidate in folder.iterdir():
        if name is None and _LIBRARY_TEMPORARY.match(candidate.name):
            with contextlib.suppress(OSError):
                if time.time() - candidate.stat().st_mtime > LIBRARY_TEMPORARY_AGE_S:
                    candidate.unlink()
                    removed.append(candidate)
            continue
        match = _TEMPORARY.match(candidate.name)
        if not match or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # one of ours, possibly being written right now by another thread
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _short(identity: object) -> str:
    if not isinstance(identity, dict):
        return repr(identity)
    weights = str(identity.get("weights_sha256", "?"))[:12]
    rest = {k: v for k, v in identity.items() if k != "weights_sha256"}
    return f"{rest}, weights {weights}"
