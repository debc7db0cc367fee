"""The tokenizer's memory: its BPE cache bounded, so data-loader workers do not grow through an epoch (glibc)."""

from __future__ import annotations

import random

import pytest

from captune.internvl.tokenizer import load_tokenizer


def _malloc_in_use() -> int:
    """Bytes in use in the C allocator (glibc), where the Rust tokenizer keeps its cache."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    mallinfo2.restype = Mallinfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def test_memory_stays_flat_over_many_distinct_captions(tok_dir):
    # Every distinct caption used to stay cached (up to 10,000, ~3 KB each): a data-loader worker's memory grew
    # through its first thousands of captions (9 MB over 3,000), and with 1,024 entries still ~3 MB per worker (the
    # length count's batch calls leave the cache nearly empty, so every forked worker filled its own).
    tokenizer = load_tokenizer(tok_dir)
    rng = random.Random(0)
    words = ["a", "man", "woman", "dog", "riding", "sitting", "on", "the", "with", "near", "red", "table", "beach"]
    captions = [" ".join(rng.choice(words) for _ in range(12)) + f" {i}." for i in range(4000)]
    for caption in captions[:10]:  # one at a time, as the training dataset encodes them
        tokenizer(caption)
    before = _malloc_in_use()
    for caption in captions[10:]:
        tokenizer(caption)
    assert _malloc_in_use() - before < 2**20
