"""The evaluation's loader keeps a few batches ahead of the model, not DataLoader's several per worker (a batch of
64 7-tile images is 270 MB of pinned memory)."""

from __future__ import annotations

import pytest

from captune.eval.captions import AHEAD, CaptionDataset, caption_loader


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8, 12])
def test_batches_ahead_are_bounded(workers):
    from helpers.demo_model import demo_model_and_images

    _, processor, _ = demo_model_and_images("cpu")
    loader = caption_loader(CaptionDataset([], processor, "q", 6), processor, 64, workers, pin_memory=False)
    ahead = workers * loader.prefetch_factor
    assert AHEAD <= ahead < AHEAD + workers
    if workers >= AHEAD:
        assert ahead == workers  # 12 workers: 12 batches (3.2 GB at 64 7-tile images), not 48
