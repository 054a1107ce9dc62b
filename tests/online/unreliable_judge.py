"""A judge that sometimes gives no verdict, as real ones do (a reward model's NaN, a grader
that returns None): every fifth sample by its text's checksum is NaN, every seventh None."""

import zlib


def score(prompt: str, completion: str) -> float | None:
    key = zlib.crc32(f"{prompt}|{completion}".encode())
    if key % 5 == 0:
        return float("nan")
    if key % 7 == 0:
        return None
    return min(1.0, len(set(completion)) / 6)
