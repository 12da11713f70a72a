"""Bit packing of quantized values: b-bit codes in bytes, b in 2, 4, 8 or 16.

A b-bit quantizer uses the symmetric integers -L..L with L = 2^(b-1) - 1,
sent as codes q + L in 0..2L. That leaves the top code 2^b - 1 unused: it
would stand for +2^(b-1), outside the grid, and `unpack` refuses it, so a
device cannot claim a value beyond the range. Codes are packed little end
first: for 4 bits, value 0 is the low nibble of byte 0; for 16 bits, each
code is two little-endian bytes.
"""
from __future__ import annotations

import numpy as np

from contract.protocol.errors import ErrorCode, ProtocolError

WIDTHS = (2, 4, 8, 16)


def levels(bits: int) -> int:
    """L: the quantized values of a b-bit grid are -L..L."""
    return 2 ** (bits - 1) - 1


def packed_bytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [-L, L] → uint8 [packed_bytes(len(values), bits)]."""
    if bits not in WIDTHS:
        raise ValueError(f"bit width {bits} is not one of {WIDTHS}")
    codes = np.asarray(values, np.int64) + levels(bits)
    if codes.size and (codes.min() < 0 or codes.max() > 2 * levels(bits)):
        raise ValueError(f"values outside [-{levels(bits)}, {levels(bits)}]")
    if bits == 16:
        return codes.astype("<u2").view(np.uint8)
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    padded = np.zeros(packed_bytes(len(codes), bits) * per, np.uint8)
    padded[:len(codes)] = codes
    lanes = padded.reshape(-1, per)
    out = np.zeros(len(lanes), np.uint8)
    for i in range(per):
        out |= lanes[:, i] << np.uint8(i * bits)
    return out


def _checked(data, bits: int, count: int, what: str) -> np.ndarray:
    """A flat uint8 tensor of exactly the bytes `count` values of `bits` bits pack into."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ProtocolError(ErrorCode.MALFORMED_UPDATE, f"packed {what} must be a flat uint8 tensor")
    if len(data) != packed_bytes(count, bits):
        raise ProtocolError(ErrorCode.WRONG_LENGTH, f"{count} values of {bits} bits pack into "
                            f"{packed_bytes(count, bits)} bytes, not {len(data)}")
    return data


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 bytes → int32 values in [-L, L]; ProtocolError if the length or a code is wrong."""
    data = _checked(data, bits, count, "codes")
    if bits == 16:
        codes = data.view("<u2").astype(np.int32)
    elif bits == 8:
        codes = data.astype(np.int32)
    else:
        per, mask = 8 // bits, (1 << bits) - 1
        shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
        codes = ((data[:, None] >> shifts) & mask).reshape(-1)[:count].astype(np.int32)
        if count % per and np.any(((data[-1] >> shifts[count % per:]) & mask) != 0):
            raise ProtocolError(ErrorCode.MALFORMED_UPDATE, "the unused bits of the last byte are not zero")
    top = 2 * levels(bits)
    if codes.size and codes.max() > top:
        raise ProtocolError(ErrorCode.VALUE_OUT_OF_RANGE, f"a {bits}-bit code is at most {top} "
                            f"(values -{levels(bits)}..{levels(bits)}); got {int(codes.max())}")
    codes -= levels(bits)
    return codes


def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2^bits (1 <= bits <= 32) → uint8, little end first, no padding between."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bit width {bits} is not in [1, 32]")
    words = np.ascontiguousarray(values, "<u4")
    if words.size and int(words.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    stream = np.unpackbits(words.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_uint(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack_uint`: `count` values as uint32; ProtocolError for a wrong length or padding."""
    data = _checked(data, bits, count, "values")
    stream = np.unpackbits(data, bitorder="little")
    if stream[count * bits:].any():
        raise ProtocolError(ErrorCode.MALFORMED_UPDATE, "the unused bits of the last byte are not zero")
    wide = np.zeros((count, 32), np.uint8)
    wide[:, :bits] = stream[:count * bits].reshape(count, bits)
    return np.packbits(wide, axis=1, bitorder="little").view("<u4").reshape(-1).astype(np.uint32)
