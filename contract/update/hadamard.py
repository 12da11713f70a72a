"""A randomized Hadamard rotation in blocks (Suresh et al. 2017), exactly invertible.

Before quantizing, a vector is padded to whole blocks of B coordinates,
permuted, multiplied by random signs and transformed block by block with the
orthonormal Walsh-Hadamard matrix H/sqrt(B). Afterwards each coordinate is
close to Gaussian with the block's energy spread evenly, so a b-bit grid
fitted to a block's largest value wastes few levels on outliers; without it
an update's few large coordinates (the embedding rows of frequent words) set
the grid for all the others. The permutation, applied to the whole padded
vector, also spreads every tensor over every block, so blocks carry similar
energy.

Why blocks, and why B a power of four: rotating the whole vector would pad
1,422,638 weights to 2^21 (47% more to upload), blocks of 1,024 pad it by
0.05%; and sqrt(B) is then a power of two, so the normalization is exact and
rotating back returns the float32 input bit for bit (the transform runs in
float64, whose 53 bits hold every partial sum of float32 values exactly
enough to round back to them).

The permutation and signs come from the round's seed: every device of a
round rotates with the same matrix, so the server rotates the *sum* back
once. This randomness is not security randomness (it only decorrelates the
coordinates), so NumPy's generator is the right tool.
"""
from __future__ import annotations

import functools

import numpy as np

BLOCK_SIZES = tuple(4 ** k for k in range(4, 9))   # 256 ... 65,536


def padded_size(size: int, block: int) -> int:
    return -(-size // block) * block


@functools.lru_cache(maxsize=4)
def _permutation_and_signs(padded: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0x48414441])   # "HADA": a stream of its own
    perm = rng.permutation(padded)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(padded)
    signs = rng.integers(0, 2, padded).astype(np.float64) * 2.0 - 1.0
    for a in (perm, inverse, signs):
        a.setflags(write=False)
    return perm, inverse, signs


def _fwht_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of each consecutive block of `x` (float64, in place)."""
    blocks = x.reshape(-1, block)
    h = 1
    while h < block:
        view = blocks.reshape(blocks.shape[0], block // (2 * h), 2, h)
        a = view[:, :, 0, :].copy()
        view[:, :, 0, :] += view[:, :, 1, :]
        view[:, :, 1, :] = a - view[:, :, 1, :]
        h *= 2
    x *= 1.0 / np.sqrt(block)    # a power of two when block is a power of four: exact
    return x


def rotate(x: np.ndarray, block: int, seed: int) -> np.ndarray:
    """float [n] → float64 [padded_size(n, block)]: pad, permute, flip signs, Hadamard per block."""
    if block not in BLOCK_SIZES:
        raise ValueError(f"block size {block} is not one of {BLOCK_SIZES}")
    padded = padded_size(len(x), block)
    perm, _, signs = _permutation_and_signs(padded, seed)
    out = np.zeros(padded, np.float64)
    out[:len(x)] = x
    out = out[perm]
    out *= signs
    return _fwht_blocks(out, block)


def unrotate(z: np.ndarray, size: int, block: int, seed: int) -> np.ndarray:
    """The inverse of `rotate`: float [padded] → float64 [size]."""
    padded = len(z)
    if padded != padded_size(size, block):
        raise ValueError(f"a rotated vector of {size} values has {padded_size(size, block)} entries, "
                         f"not {padded}")
    _, inverse, signs = _permutation_and_signs(padded, seed)
    out = _fwht_blocks(np.array(z, np.float64, copy=True), block)
    out *= signs
    return out[inverse][:size]
