"""Expert weight quantization in ONNX Runtime's QMoE layout, and its exact inverse.

Layout (QMoE, ``weights_prepacked=0``): weights (E, N, K) become uint8 (E, N, K*bits/8), values
packed along K with the low nibble first; scales (E, N) with one scale per output row, or
(E, N, K/block_size) block-wise; the zero point is 2^(bits-1) unless zero points are given
(asymmetric), packed like the weights along their last axis.

Written by hand: ONNX Runtime's own quantizers (MatMulNBits) handle 2-D MatMul weights, not the
3-D expert tensors of QMoE, and do not search clipping ranges.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["METHODS", "QuantSpec", "QuantizedWeight", "dequantize", "pack", "quantize", "quantize_with_error",
           "unpack"]

METHODS = ("rtn", "mse")
# Clip ratios searched by --method mse: the group's range is scaled by each, the best error wins.
MSE_RATIOS = np.linspace(1.0, 0.5, 26)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    block_size: int = 64  # 0: one scale per output row
    symmetric: bool = True
    method: str = "mse"

    def check(self, n: int, k: int, what: str = "weight") -> None:
        """Raise ValueError when this spec cannot be applied to an (N, K) weight."""
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        per_byte = 8 // self.bits
        if self.block_size:
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise ValueError(f"block size must be a power of two >= 16, got {self.block_size}")
            if k % self.block_size:
                raise ValueError(f"block size {self.block_size} does not divide the {what} input size {k}")
            if not self.symmetric and (k // self.block_size) % per_byte:
                raise ValueError(f"asymmetric int{self.bits} with block size {self.block_size} needs the {what} "
                                 f"input size {k} divisible by {self.block_size * per_byte}")
        elif not self.symmetric and n % per_byte:
            raise ValueError(f"asymmetric int{self.bits} per-row needs the {what} output size {n} even")
        if k % per_byte:
            raise ValueError(f"int{self.bits} packing needs the {what} input size {k} divisible by {per_byte}")


@dataclass
class QuantizedWeight:
    packed: np.ndarray  # uint8 (E, N, K*bits/8)
    scales: np.ndarray  # float32 (E, N) or (E, N, K/block_size)
    zero_points: np.ndarray | None  # uint8, packed along the last axis, or None (symmetric)
    shape: tuple[int, int, int]


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits, packed along the last axis, low nibble first for 4 bits."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _groups(w: np.ndarray, block_size: int) -> np.ndarray:
    """(E, N, K) -> (E, N, G, B): G groups of B values along K (one group of K when per-row)."""
    e, n, k = w.shape
    b = block_size or k
    return w.reshape(e, n, k // b, b)


def _range(g: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each group's full-range step (scale before clipping) and zero point."""
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    if symmetric:
        step = np.maximum(np.abs(lo), np.abs(hi)) / (2 ** (bits - 1) - 1)
        zero = np.full(lo.shape, 2 ** (bits - 1), dtype=np.float32)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        step = (hi - lo) / (2**bits - 1)
        zero = np.clip(np.round(-lo / np.where(step == 0, 1, step)), 0, 2**bits - 1).astype(np.float32)
    return np.where(step == 0, 1.0, step).astype(np.float32), zero


def _best_ratio(x: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Per group, the clip ratio r in MSE_RATIOS minimising sum((clip(round(x / r) + zero) - zero) * r - x)^2,
    where x is the group in units of its full-range step. Clipping scales lo and hi alike, so the zero
    point does not depend on r and the search runs in place on one buffer."""
    qmax = 2**bits - 1
    zero = zero[..., None]
    t = np.empty_like(x)
    best_err = best = None
    for r in MSE_RATIOS.astype(np.float32):
        np.multiply(x, 1 / r, out=t)
        t += zero
        np.rint(t, out=t)
        np.clip(t, 0, qmax, out=t)
        t -= zero
        t *= r
        t -= x
        np.square(t, out=t)
        err = t.sum(axis=-1)
        if best_err is None:
            best_err, best = err, np.full(err.shape, r, dtype=np.float32)
        else:
            better = err < best_err
            best_err, best = np.where(better, err, best_err), np.where(better, r, best)
    return best


def quantize(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Quantize expert weights (E, N, K); method 'mse' searches the clip range per group."""
    e, n, k = w.shape
    spec.check(n, k)
    g = _groups(w.astype(np.float32), spec.block_size)
    step, zero = _range(g, spec.bits, spec.symmetric)
    if spec.method == "mse":
        step = step * _best_ratio(g / step[..., None], zero, spec.bits)
    scale = step
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, 2**spec.bits - 1)
    packed = pack(q.reshape(e, n, k), spec.bits)
    zp = None
    if not spec.symmetric:
        zp = pack(zero.astype(np.uint8) if spec.block_size else zero[..., 0].astype(np.uint8), spec.bits)
    scales = scale if spec.block_size else scale[..., 0]
    return QuantizedWeight(packed, scales.astype(np.float32), zp, (e, n, k))


# Experts quantized at a time: about this many weights, so the search's temporaries stay near 100 MB.
CHUNK_ELEMENTS = 1 << 22


def quantize_with_error(w: np.ndarray, spec: QuantSpec) -> tuple[QuantizedWeight, float]:
    """``quantize`` a few experts at a time (bounded memory, whatever E is) and the relative RMS error of
    the weights it gives, ||dequantized - w|| / ||w||."""
    e, n, k = w.shape
    spec.check(n, k)
    step = max(1, CHUNK_ELEMENTS // (n * k))

    def one(start: int) -> tuple[QuantizedWeight, float, float]:
        chunk = np.asarray(w[start:start + step], dtype=np.float32)
        q = quantize(chunk, spec)
        return (q, float(np.square(dequantize(q, spec) - chunk, dtype=np.float64).sum()),
                float(np.square(chunk, dtype=np.float64).sum()))

    # NumPy releases the GIL in its loops: chunks run on every core
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, range(0, e, step)))
    parts = [r[0] for r in results]
    err, norm = sum(r[1] for r in results), sum(r[2] for r in results)
    zero_points = None if spec.symmetric else np.concatenate([p.zero_points for p in parts])
    merged = QuantizedWeight(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
                             zero_points, (e, n, k))
    return merged, float(np.sqrt(err / max(norm, 1e-30)))


def dequantize(qw: QuantizedWeight, spec: QuantSpec) -> np.ndarray:
    """The float weights (E, N, K) that a QMoE node computes with."""
    e, n, k = qw.shape
    q = unpack(qw.packed, spec.bits).astype(np.float32).reshape(_groups(np.empty(qw.shape), spec.block_size).shape)
    if qw.zero_points is None:
        zero = np.float32(2 ** (spec.bits - 1))
    else:
        zero = unpack(qw.zero_points, spec.bits).astype(np.float32)
        zero = zero[..., None] if spec.block_size else zero[..., None, None]
    scales = qw.scales if spec.block_size else qw.scales[..., None]
    return ((q - zero) * scales[..., None]).reshape(e, n, k)
