"""Mask expansion: a pseudo-random vector modulo 2^b from a 256-bit seed.

AES-256 in counter mode (pycryptodome) is the PRG: the keystream for a seed is read
as little-endian unsigned integers of ``b`` bits (32 or 64), which are uniform modulo
2^b. Bonawitz et al. (CCS 2017, section 4) require exactly this: a secure PRG
expanding a seed into a vector over the message space Z_R.
"""

from __future__ import annotations

import numpy as np
from Crypto.Cipher import AES

_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


def mask_dtype(modulus_bits: int) -> np.dtype:
    """The unsigned NumPy dtype whose natural wrap-around is arithmetic mod 2^b."""
    try:
        return _DTYPES[modulus_bits]
    except KeyError:
        raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits}") from None


def expand(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` integers uniform modulo 2^modulus_bits.

    Returns:
        1-D array of ``uint32`` or ``uint64`` (little-endian), shape ``(length,)``.
    """
    if len(seed) != 32:
        raise ValueError(f"seed must be 32 bytes, got {len(seed)}")
    dtype = mask_dtype(modulus_bits)
    cipher = AES.new(seed, AES.MODE_CTR, nonce=b"", initial_value=0)
    stream = cipher.encrypt(bytes(length * dtype.itemsize))
    return np.frombuffer(stream, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
