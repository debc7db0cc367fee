"""Samples held compactly give back exactly the samples they were made of."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captune.data.samples import Sample
from captune.data.table import SampleTable, Strings


def test_strings_round_trip():
    texts = ["", "a", "café", "一只猫", "two\nlines", ""]
    strings = Strings.of(texts)
    assert list(strings) == texts and len(strings) == len(texts)


def test_table_round_trip_and_sharing():
    q = {"from": "human", "value": "<image>\nDescribe."}
    samples = [Sample(Path("/a.jpg"), (q, {"from": "gpt", "value": "one"})),
               Sample(Path("/b.jpg"), (q, {"from": "gpt", "value": "two"})),
               Sample(Path("/a.jpg"), ({"from": "human", "value": "<image>\nOther?"}, {"from": "gpt", "value": "3"})),
               Sample(Path("/c.jpg"), ({"from": "system", "value": "s"}, q, {"from": "gpt", "value": "four"}))]
    table = SampleTable.of(samples)
    assert [table[i] for i in range(len(table))] == samples
    assert list(table.images) == ["/a.jpg", "/b.jpg", "/c.jpg"]  # each image path once
    assert list(table.questions) == [q["value"], "<image>\nOther?"]
    assert table.is_caption(0) and not table.is_caption(3)
    assert table.image_of.dtype == np.int32 and table.nbytes < 1000
