"""Quantized KV storage: int8 and float8_e4m3 keys/values with per-token, per-head scales.

A stored vector ``x`` (one token of one kv head, ``dim`` entries) is kept as ``q = x / s`` rounded to the
storage type, with one float32 scale ``s = absmax(x) / QMAX`` (``QMAX`` = 127 for int8, 448 for e4m3), so
``dequantize(q, s) = q * s``. The largest entry of every vector is then exact up to float32 and the error of
an entry is at most ``s / 2`` (int8) or half an e4m3 step (3 mantissa bits) of ``|x| / s``.

:class:`QuantTensor` is the ring's storage when the cache's ``kv_dtype`` is quantized: it answers the few
tensor operations the cache does on its buffers (basic indexing giving views, slice assignment, scatter,
index copy / select, zeroing), quantizing what is written and dequantizing only what is read, so no
full-precision copy of the ring is ever kept. float8 data are held as their raw bytes (``uint8``) so that
every device's scatter / index kernels apply; :meth:`QuantTensor.values` reinterprets them.
"""

from __future__ import annotations

import torch

KV_DTYPES = ("bfloat16", "float16", "float32", "int8", "float8_e4m3")
"""Accepted values of ``kv_dtype`` (the first three store keys/values as they are, in that dtype)."""

QUANTIZED = {"int8": torch.int8, "float8_e4m3": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "float8_e4m3": 448.0}
_RAW = {"int8": torch.int8, "float8_e4m3": torch.uint8}  # how the data are held (fp8 as its bytes)
_FLOAT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_kv_dtype(kv_dtype: str | None) -> str | None:
    """Return ``kv_dtype`` if it is one of :data:`KV_DTYPES` (or None: the compute dtype).

    Raises:
        ValueError: Any other value (the message lists the accepted ones).
    """
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}.")
    return kv_dtype


def is_quantized(kv_dtype: str | None) -> bool:
    """Whether ``kv_dtype`` is a quantized storage (int8, float8_e4m3)."""
    return kv_dtype in QUANTIZED


def float_dtype(kv_dtype: str) -> torch.dtype:
    """The torch dtype of an unquantized ``kv_dtype``."""
    return _FLOAT[kv_dtype]


def quantize(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``(..., dim)`` per vector of its last dimension.

    Returns:
        ``(data, scale)``: data ``(..., dim)`` in int8 (``"int8"``) or raw e4m3 bytes as uint8
        (``"float8_e4m3"``), scale ``(..., 1)`` float32 (0 for an all-zero vector).
    """
    qmax = QMAX[kv_dtype]
    work = x.float()
    scale = work.abs().amax(dim=-1, keepdim=True) / qmax
    scaled = work / torch.where(scale > 0, scale, torch.ones_like(scale))
    if kv_dtype == "int8":
        return scaled.round().clamp(-qmax, qmax).to(torch.int8), scale
    return scaled.clamp(-qmax, qmax).to(torch.float8_e4m3fn).view(torch.uint8), scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, kv_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    """``data * scale`` in ``dtype`` (the inverse of :func:`quantize` up to its rounding)."""
    if kv_dtype == "float8_e4m3":
        data = data.view(torch.float8_e4m3fn)
    return (data.float() * scale).to(dtype)


class QuantTensor:
    """A quantized buffer ``(..., slots, dim)`` with scales ``(..., slots, 1)``; see the module docstring.

    Indexing must leave the last dimension alone (the cache indexes layers, rows, heads and slots only);
    it returns a :class:`QuantTensor` of views, so writes through it land in the buffer.
    """

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, kv_dtype: str, dtype: torch.dtype):
        self.data, self.scale, self.kv_dtype, self.dtype = data, scale, kv_dtype, dtype

    @classmethod
    def zeros(cls, *shape: int, kv_dtype: str, dtype: torch.dtype, device) -> QuantTensor:
        """An all-zero buffer of ``shape``; ``dtype``: the compute dtype reads dequantize to."""
        data = torch.zeros(*shape, dtype=_RAW[kv_dtype], device=device)
        scale = torch.zeros(*shape[:-1], 1, dtype=torch.float32, device=device)
        return cls(data, scale, kv_dtype, dtype)

    # -- what the cache reads of a tensor -------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dim(self) -> int:
        return self.data.dim()

    @property
    def nbytes(self) -> int:
        """Bytes held, scales included."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def values(self) -> torch.Tensor:
        """The stored data in their storage dtype (``torch.int8`` or ``torch.float8_e4m3fn``), a view."""
        return self.data.view(torch.float8_e4m3fn) if self.kv_dtype == "float8_e4m3" else self.data

    def __getitem__(self, index) -> QuantTensor:
        return QuantTensor(self.data[index], self.scale[index], self.kv_dtype, self.dtype)

    def __setitem__(self, index, x: torch.Tensor | QuantTensor) -> None:
        data, scale = self._quantized(x)
        self.data[index], self.scale[index] = data, scale

    def _quantized(self, x: torch.Tensor | QuantTensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, QuantTensor):
            if x.kv_dtype == self.kv_dtype:
                return x.data, x.scale
            x = x.dequantize(torch.float32)
        return quantize(x, self.kv_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new full-precision tensor of these entries (in ``dtype``, default the compute dtype)."""
        return dequantize(self.data, self.scale, self.kv_dtype, dtype or self.dtype)

    # -- in-place writes ------------------------------------------------------------------------------------
    def copy_(self, x: torch.Tensor | QuantTensor) -> QuantTensor:
        data, scale = self._quantized(x)
        self.data.copy_(data)
        self.scale.copy_(scale)
        return self

    def zero_(self) -> QuantTensor:
        self.data.zero_()
        self.scale.zero_()
        return self

    def scatter_(self, dim: int, index: torch.Tensor, x: torch.Tensor) -> QuantTensor:
        """Scatter along ``dim`` (not the last); ``index`` shaped like ``x`` as for ``Tensor.scatter_``."""
        data, scale = self._quantized(x)
        self.data.scatter_(dim, index, data)
        self.scale.scatter_(dim, index[..., :1], scale)
        return self

    def index_copy_(self, dim: int, index: torch.Tensor, x: torch.Tensor) -> QuantTensor:
        data, scale = self._quantized(x)
        self.data.index_copy_(dim, index, data)
        self.scale.index_copy_(dim, index, scale)
        return self

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """The selected entries, dequantized (a read)."""
        data, scale = self.data.index_select(dim, index), self.scale.index_select(dim, index)
        return dequantize(data, scale, self.kv_dtype, self.dtype)
