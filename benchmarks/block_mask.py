"""Building a training micro-batch's FlexAttention BlockMask, eagerly and compiled, for rows of new lengths (GPU):

    PYTHONPATH=src python benchmarks/block_mask.py [--compiled]

Rows as the shared-prefix collation makes them (images of 2,000 tokens: a 1,800-token prompt and 10 captions of 20
tokens), one row per micro-batch, first of lengths that change (unpadded rows: training without `--compile`), then of
the one padded length, all through `PrefixSharing.block_mask`. Prints the seconds of each build and the peak memory.
`--compiled` also times the compiled builder (`create_block_mask(..., _compile=True)`, which `block_mask` uses only for
rows padded to the budget; here every row is marked so): on torch 2.11 it had not finished compiling its first length
after 235 s (docs/benchmarks.md), so leave it to run or stop it.
"""

from __future__ import annotations

import argparse
import time

import torch

from captune.train.collate import PrefixSharing

BUDGET = 16_384


def row(tokens: int, device: torch.device, compiled: bool) -> PrefixSharing:
    """One row of `tokens` tokens: whole images of 2,000 tokens, padding after them; marked padded to the budget (so
    built by the compiled builder) when `compiled`."""
    doc = torch.full((1, tokens), -1)
    branch = torch.zeros(1, tokens, dtype=torch.long)
    for d, start in enumerate(range(0, tokens - 1_999, 2_000)):
        doc[0, start : start + 2_000] = d
        for k in range(10):
            branch[0, start + 1_800 + 20 * k : start + 1_820 + 20 * k] = k + 1
    return PrefixSharing(doc.to(device), branch.to(device), static=compiled)


def build_seconds(mask: PrefixSharing) -> float:
    sync = torch.cuda.synchronize if mask.doc.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    mask.block_mask()  # compiled where the rows are marked padded (static) and on a GPU
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiled", action="store_true", help="also time the compiled builder (minutes)")
    parser.add_argument("--device", default="cuda", help="where to build the masks (cpu: to try the script)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for compiled in (False, True) if args.compiled else (False,):
        for name, lengths in (("new lengths", [14_000 + 200 * i for i in range(6)]), ("padded", [BUDGET] * 4)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = [build_seconds(row(t, device, compiled)) for t in lengths]
            peak = f"; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GB" if device.type == "cuda" else ""
            print(f"{'compiled' if compiled else 'eager'} builder, {name}: {', '.join(f'{s:.3f}' for s in seconds)} s"
                  f"{peak}", flush=True)


if __name__ == "__main__":
    main()
