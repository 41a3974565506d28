"""Opt-in int4 weight-only linear layers for CPU inference (``load_model(quantize="int4")``).

At the embedded SmolLM2-135M's size a CPU decode step is bound by reading weights: fp32 weights are
540 MB, read once per token. Here every ``nn.Linear`` of the decoder (and the LM head) is replaced by
:class:`Int4Linear`, whose weight is quantised per group of ``group_size`` input features to 4 bits
(asymmetric: a scale and a minimum per group, as GGUF's Q4_1) and packed for PyTorch's own CPU kernel
``torch.ops.aten._weight_int4pack_mm_for_cpu``. Activations enter that kernel in bf16 (its fast path
on AVX2/AVX-512) and come back in the model's dtype, so norms, residuals, rotary embeddings and the
KV cache stay fp32. The token embedding stays fp32 (a lookup reads one row per token).

Chunks (prefill, ingestion) of more than :data:`CHUNK_ROWS` tokens are compute-bound, where that
kernel's bf16 path is slower than an fp32 GEMM on AVX2: there each layer unpacks its weight to fp32
(a cost shared by the whole chunk) and multiplies as ``nn.Linear`` would.

This is a lower-precision mode: logits differ from fp32. The exactness tests stay on fp32; the
perplexity of this mode is measured by ``benchmarks/cpu_decode.py``.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)
MISSING_KERNELS = "This PyTorch has no CPU int4 kernels (_weight_int4pack_mm_for_cpu); use PyTorch >= 2.5."
QUANTIZE_MODES = ("int4",)
CHUNK_ROWS = 16  # inputs with more rows than this use the unpacked fp32 weight (a GEMM), fewer the int4 kernel


def available() -> bool:
    """Whether this PyTorch has the CPU int4 kernels (PyTorch >= 2.5)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``weight`` ``(out, in)`` to 4 bits per group of ``group_size`` input features.

    Returns:
        ``(q, scale, minimum)``: ``q`` int32 ``(out, in)`` in ``0..15``; ``scale`` and ``minimum`` fp32
        ``(out, in // group_size)``, so that ``q * scale + minimum`` (per group) approximates ``weight``.

    Raises:
        ValueError: ``group_size`` not one of :data:`GROUP_SIZES`, or ``in`` not a multiple of it.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, not {group_size}.")
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features ({in_features}) is not a multiple of group_size ({group_size}).")
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    minimum = groups.amin(-1)
    scale = ((groups.amax(-1) - minimum) / 15).clamp(min=1e-8)
    q = ((groups - minimum[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(out_features, in_features), scale, minimum


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The fp32 weight ``(out, in)`` that :func:`quantize_int4`'s ``(q, scale, minimum)`` stand for."""
    out_features, in_features = q.shape
    groups = q.float().reshape(out_features, scale.shape[1], -1)
    return (groups * scale[..., None] + minimum[..., None]).reshape(out_features, in_features)


class Int4Linear(nn.Module):
    """A ``nn.Linear`` whose weight is int4 (per group), run by PyTorch's CPU int4 kernel.

    Args:
        linear: The layer to replace (its weight is quantised; its bias, if any, kept in fp32).
        group_size: Input features per quantisation group (32 or 64 keep SmolLM2's perplexity
            within about 1% of fp32; see ``benchmarks/results/cpu_decode.md``).
        compute_dtype: The activations' dtype inside the kernel (bf16: its fast path).

    Shapes: input ``(..., in_features)`` of any float dtype; output ``(..., out_features)`` in the input's dtype.

    Raises:
        RuntimeError: This PyTorch lacks the CPU int4 kernels.
        ValueError: As :func:`quantize_int4`.
    """

    def __init__(self, linear: nn.Linear, group_size: int = 32, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not available():
            raise RuntimeError(MISSING_KERNELS)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size, self.compute_dtype = group_size, compute_dtype
        q, scale, minimum = quantize_int4(linear.weight.detach().cpu(), group_size)
        # The kernel's convention: w = (q - 8) * scale + zero, with scales and zeros (in/group, out, 2).
        zero = minimum + 8 * scale
        scales_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(compute_dtype)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        # Two codes a byte (even input feature in the low nibble), for the fp32 path of long chunks.
        nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        self.register_buffer("nibbles", nibbles, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("minimum", minimum, persistent=False)
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight ``(out_features, in_features)`` this layer multiplies by (unpacked from int4)."""
        q = torch.stack((self.nibbles & 15, self.nibbles >> 4), dim=-1).reshape(self.out_features, self.in_features)
        return dequantize_int4(q, self.scale, self.minimum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > CHUNK_ROWS:  # a chunk: one unpack, then an fp32 GEMM
            out = torch.nn.functional.linear(flat.float(), self.dequantized()).to(x.dtype)
        else:
            kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
            out = kernel(flat.to(self.compute_dtype), self.packed, self.group_size, self.scales_zeros).to(x.dtype)
        out = out.reshape(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, int4"


class Int8Linear(nn.Module):
    """A ``nn.Linear`` whose weight is int8 with one scale per output feature (symmetric), run by PyTorch's
    CPU kernel ``torch.ops.aten._weight_int8pack_mm`` with bf16 activations. Used for the LM head, which
    GGUF files keep at 8 bits (int4 there costs SmolLM2 ~6% perplexity).

    Shapes: input ``(..., in_features)``; output ``(..., out_features)`` in the input's dtype.
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = linear.in_features, linear.out_features, compute_dtype
        w = linear.weight.detach().float().cpu()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
        self.register_buffer("q", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight ``(out_features, in_features)`` this layer multiplies by."""
        return self.q.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > CHUNK_ROWS:
            out = torch.nn.functional.linear(flat.float(), self.dequantized()).to(x.dtype)
        else:
            scale = self.scale.to(self.compute_dtype)
            out = torch.ops.aten._weight_int8pack_mm(flat.to(self.compute_dtype), self.q, scale).to(x.dtype)
        out = out.reshape(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)


def quantize_model(model: nn.Module, mode: str = "int4", group_size: int = 32) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (on the CPU) by an :class:`Int4Linear`, in place.

    The LM head (the output embedding) becomes an :class:`Int8Linear` instead, as GGUF keeps it at 8 bits,
    even when tied to the token embedding (which stays fp32). Layers whose ``in_features`` is not a
    multiple of ``group_size`` are left as they are.

    Returns:
        ``model``.

    Raises:
        ValueError: Unknown ``mode``, a ``group_size`` not in :data:`GROUP_SIZES`, or a model not on the CPU.
        RuntimeError: This PyTorch lacks the CPU int4 kernels.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"Unknown quantize mode '{mode}'; use one of {QUANTIZE_MODES}.")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, not {group_size}.")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"--quantize {mode} runs on the CPU only (the model is on {device}).")
    if not available():
        raise RuntimeError(MISSING_KERNELS)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.in_features % group_size == 0
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module) if module is head else Int4Linear(module, group_size))
    return model
