"""Storing integer codes compactly: 4-bit (and 2/3-bit) codes two per byte, 5..8-bit codes one per byte.

Layout (docs/EXPORT_FORMAT.md): codes are packed along the last dim; element ``2i`` goes in the low nibble
and element ``2i + 1`` in the high nibble of byte ``i``. An odd last dim is padded with one zero nibble,
so the packed last dim is ``ceil(n / 2)``; `unpack_int4` needs the original shape to drop the pad.
2- and 3-bit codes use the same nibble layout (they fit in 4 bits): simple, one unpack kernel, and the
size is reported honestly as 4 bits per code.
"""

from __future__ import annotations

import torch

__all__ = ["is_packed", "pack_codes", "pack_int4", "packed_shape", "unpack_codes", "unpack_int4"]


def is_packed(bits: int) -> bool:
    """Codes of `bits` bits are nibble-packed (2..4) or kept one per byte (5..8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"only 2..8-bit codes can be stored, got bits={bits}")
    return bits <= 4


def packed_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the uint8 tensor `pack_int4` returns for codes of `shape`."""
    if len(shape) == 0:
        raise ValueError("cannot pack a 0-dim tensor; reshape it to (1,) first")
    return (*shape[:-1], (shape[-1] + 1) // 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (signed -8..7 or unsigned 0..15, any integer dtype) two per uint8 byte.

    Returns a uint8 tensor of shape ``(*q.shape[:-1], ceil(q.shape[-1] / 2))``; low nibble = even index.
    """
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"pack_int4 needs an integer tensor of codes, got dtype {q.dtype}")
    if q.dim() == 0:
        raise ValueError("cannot pack a 0-dim tensor; reshape it to (1,) first")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 15):
        raise ValueError(f"4-bit codes must lie in -8..7 or 0..15, got range {int(q.min())}..{int(q.max())}")
    nib = q.to(torch.int16).bitwise_and(0xF).to(torch.uint8)  # (..., n): two's-complement nibble
    if nib.shape[-1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))  # (..., n + 1): zero nibble pad
    pairs = nib.unflatten(-1, (-1, 2))  # (..., n/2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)  # (..., n/2) uint8


def unpack_int4(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], signed: bool = True) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes of `shape` (-8..7 if `signed`, else 0..15)."""
    shape = tuple(shape)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed 4-bit codes must be uint8, got {packed.dtype}")
    if tuple(packed.shape) != packed_shape(shape):
        raise ValueError(f"packed tensor of shape {tuple(packed.shape)} cannot hold codes of shape {shape}")
    low = packed & 0xF  # (..., n/2)
    high = packed >> 4
    q = torch.stack((low, high), dim=-1).flatten(-2)[..., : shape[-1]].to(torch.int8)  # (..., n)
    if signed:
        q = (q ^ 8) - 8  # sign-extend the nibble: 8..15 -> -8..-1
    return q


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Storage form of `bits`-bit codes: nibble-packed uint8 for 2..4 bits, the int8/uint8 codes for 5..8."""
    return pack_int4(q) if is_packed(bits) else q.contiguous()


def unpack_codes(
    stored: torch.Tensor, bits: int, shape: torch.Size | tuple[int, ...], signed: bool = True
) -> torch.Tensor:
    """Codes (int8 for signed or nibble-packed codes, the stored dtype otherwise) from `pack_codes` output."""
    if is_packed(bits):
        return unpack_int4(stored, shape, signed=signed)
    if tuple(stored.shape) != tuple(shape):
        raise ValueError(f"stored {bits}-bit codes have shape {tuple(stored.shape)}, expected {tuple(shape)}")
    return stored
