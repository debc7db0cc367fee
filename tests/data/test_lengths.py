"""The one length model: the batched count equals a real encoding of every sample, for every template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from captune.data.lengths import _encoded, measure
from captune.data.samples import Sample
from captune.data.table import SampleTable
from captune.inputs.processor import DEFAULT_QUESTION, Processor
from captune.inputs.templates import TEMPLATES, get_template
from captune.internvl.tokenizer import load_tokenizer

QUESTION = "<image>\n" + DEFAULT_QUESTION
CAPTIONS = ["A man with a red helmet on a small moped", "  leading spaces and a trailing one ", "Several",
            "A café sign reads “OPEN 24/7” — über cheap", "一只猫坐在窗台上。", "x", "Two\nlines", "ends with <|im_end"]


@pytest.fixture(scope="module")
def tokenizer(fixtures):
    return load_tokenizer(fixtures / "tokenizer_internvl2")


@pytest.fixture(scope="module")
def table(fixtures) -> SampleTable:
    ref = json.loads((fixtures / "tokenization_reference.json").read_text(encoding="utf-8"))
    samples = [Sample(Path(f"/img/{i % 3}.jpg"), ({"from": "human", "value": QUESTION}, {"from": "gpt", "value": c}))
               for i, c in enumerate(CAPTIONS)]
    samples += [Sample(Path("/img/ref.jpg"), tuple(s["conversations"])) for s in ref["train"]]
    samples.append(Sample(Path("/img/other.jpg"), ({"from": "human", "value": "<image>\nWhat is it?"},
                                                   {"from": "gpt", "value": "A dog."})))
    samples.append(Sample(Path("/img/multi.jpg"), (  # several turns: always encoded for real
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat?"},
        {"from": "gpt", "value": "A cat."}, {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."})))
    return SampleTable.of(samples)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_batched_count_equals_real_encoding(tokenizer, table, template):
    processor = Processor(tokenizer, get_template(template), tokens_per_tile=16)
    tiles = np.array([1 + i % 7 for i in range(len(table))])
    lengths = measure(table, tiles, processor)
    assert lengths.exact and not lengths.unencodable
    for i in range(len(table)):
        expected = _encoded(table, i, int(tiles[i]), processor)
        assert (lengths.total[i], lengths.prefix[i], lengths.branch[i]) == expected, (template, i)


def test_real_encoding_counts_the_image_tokens(tokenizer, table):
    """The reference the fast path is held to: a real encoding with all image tokens written out."""
    from captune.inputs.templates import encode_conversation

    processor = Processor(tokenizer, get_template("internlm2-chat"), tokens_per_tile=16)
    for i in (0, len(table) - 1):
        full = encode_conversation(tokenizer, list(table.conversations(i)), 3 * 16, processor.template)
        assert _encoded(table, i, 3, processor)[0] == len(full["input_ids"])


def test_a_tokenizer_that_disagrees_falls_back_to_real_encodings(tokenizer, table, monkeypatch):
    """If the caption's stretch of text were counted wrongly (a tokenizer merging across special tokens), the
    check against real encodings notices and every sample is encoded for real: the lengths stay right."""
    import captune.data.lengths as lengths_module

    processor = Processor(tokenizer, get_template("internlm2-chat"), tokens_per_tile=16)
    real = lengths_module._caption_tokens
    monkeypatch.setattr(lengths_module, "_caption_tokens", lambda *a: real(*a) + (np.arange(len(a[1])) % 2))
    tiles = np.ones(len(table), int)
    lengths = measure(table, tiles, processor)
    assert not lengths.exact
    for i in range(len(table)):
        assert lengths.total[i] == _encoded(table, i, 1, processor)[0]
