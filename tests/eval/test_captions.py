"""The evaluation's loader: each batch cut into one chunk per worker (the first batch is ready after one chunk's
decoding), batches assembled in the main process exactly as the processor collates them, a few batches ahead of the
model (a batch of 64 7-tile images is 270 MB)."""

from __future__ import annotations

import pytest
import torch

from captune.data.evalsets import EvalImage
from captune.eval.captions import (
    AHEAD,
    CaptionDataset,
    ChunkSampler,
    assemble,
    caption_loader,
)


@pytest.mark.parametrize("n,batch,chunks", [(130, 64, 12), (5, 4, 3), (7, 3, 1), (64, 64, 64), (10, 4, 12)])
def test_chunks_cut_each_batch_in_order(n, batch, chunks):
    sampler = ChunkSampler(n, batch, chunks)
    got = list(sampler)
    assert len(got) == len(sampler)
    assert [i for chunk in got for i in chunk] == list(range(n))  # every item once, in order
    for chunk in got:
        assert chunk and chunk[0] // batch == chunk[-1] // batch  # no chunk crosses a batch's end
    per_batch = {}
    for chunk in got:
        per_batch.setdefault(chunk[0] // batch, []).append(len(chunk))
    for b, sizes in per_batch.items():
        size = min(batch, n - b * batch)
        assert len(sizes) == min(chunks, size) and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8, 12])
def test_batches_ahead_are_bounded(workers):
    from helpers.demo_model import demo_model_and_images

    _, processor, _ = demo_model_and_images("cpu")
    loader = caption_loader(CaptionDataset([], processor, "q", 6), 64, workers)
    chunks = min(workers, 64)  # per batch
    ahead = workers * loader.prefetch_factor  # chunks
    assert AHEAD * chunks <= ahead < AHEAD * chunks + workers  # 12 workers: 4 batches (1.1 GB), not 48 (13 GB)


@pytest.mark.parametrize("workers", [0, 3])
def test_assembled_batches_are_the_processors(tmp_path, workers):
    """Chunks decoded in workers and assembled give the batches the processor collates from the same images:
    rows of different tile counts and prompt lengths left-padded alike, an unreadable image reported in its own
    batch and left out of it."""
    from helpers.demo_model import demo_model_and_images

    _, processor, pictures = demo_model_and_images("cpu")
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(tmp_path / f"{i}.png")
        picture.save(paths[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    files = [*paths[:3], broken, *paths[3:]]
    images = [EvalImage(100 + i, p) for i, p in enumerate(files)]
    batch_size = 3
    batches = list(assemble(caption_loader(CaptionDataset(images, processor, "Describe.", 6), batch_size, workers),
                            len(images), batch_size, processor, pin_memory=False))
    assert len(batches) == -(-len(files) // batch_size)
    for k, got in enumerate(batches):
        mine = images[k * batch_size : (k + 1) * batch_size]
        good = [i for i in mine if i.path != broken]
        assert [item["image_id"] for item in got["items"]] == [i.image_id for i in good]
        assert [e["image_id"] for e in got["errors"]] == [i.image_id for i in mine if i.path == broken]
        expected = processor([i.path for i in good], question="Describe.", max_tiles=6)
        assert got["batch"].keys() == expected.keys()
        for key in expected:
            assert torch.equal(got["batch"][key], expected[key]), key
    tiles = {len(b["batch"]["pixel_values"]) / len(b["items"]) for b in batches}
    lengths = {int(b["batch"]["attention_mask"].sum(1).min()) for b in batches}
    assert len(tiles) > 1 and len(lengths) > 1  # the images differ in tile count and prompt length


def test_a_batch_is_given_out_when_its_last_chunk_arrives():
    """Not when the next batch's first chunk does: the GPU starts on a batch as soon as it is decoded."""
    chunks = [[{"index": i, "image_id": i, "image": "x", "error": "unreadable"} for i in c]
              for c in ChunkSampler(7, 3, 2)]
    seen = []

    def fed():
        for chunk in chunks:
            seen.append(chunk[0]["index"])
            yield chunk

    for batch in assemble(fed(), 7, 3, processor=None, pin_memory=False):
        last = batch["errors"][-1]["index"]
        assert seen[-1] <= last  # no chunk of a later batch was read before this batch was given out
    assert seen == [0, 1, 3, 4, 6]
