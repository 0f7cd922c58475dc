"""A JPEG's size from its frame header, without decoding: what the DALI feeder needs to place a crop
window, and the cheapest test that a sample is a JPEG at all.

Library module, no CLI.
"""

from __future__ import annotations

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(buf) -> tuple[int, int]:
    """``(height, width)`` from a JPEG's frame header, without decoding; ValueError when there is none."""
    b = bytes(buf[:2])
    if b != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {i}")
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if marker in _SOF:
            if i + 9 > n:
                break
            h = (buf[i + 5] << 8) | buf[i + 6]
            w = (buf[i + 7] << 8) | buf[i + 8]
            if h == 0 or w == 0:
                raise ValueError("JPEG frame header with a zero dimension")
            return h, w
        if marker in (0xD9, 0xDA):
            break
        i += 2 + length
    raise ValueError("JPEG without a frame header")
