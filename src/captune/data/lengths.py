"""How long each training sample is once encoded: the one length model of the training schedule and `data check`.

`encode_conversation` builds a sample as InternVL's trainer does, with several tokenizer calls; for 566,747 captions
that takes minutes on one core. A caption sample (one question, one answer) is measured instead as a constant of its
question plus the tokens of the stretch of text that holds its caption (from the template's last special token
before the caption to the special token after it: a fast tokenizer never merges across special tokens), counted for
all captions in batched calls of the Rust tokenizer. The constants come from encoding one real sample per question,
and the result is compared with real encodings of a few dozen samples before it is trusted; if any differs, every
sample is encoded for real. Other conversations (several turns, a system turn) are always encoded for real.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from captune.data.table import SampleTable
from captune.errors import CaptuneError
from captune.inputs.templates import encode_conversation, supervised_span

_CHECKED = 64  # samples encoded for real to confirm the fast path
_CHUNK = 8192  # captions per batched tokenizer call (bounds the Encoding objects alive at once)


@dataclass
class Lengths:
    """Token counts of each sample of a table at its image's tile count."""

    total: np.ndarray  # [N] int64: len(input_ids), image tokens included, before any truncation
    prefix: np.ndarray  # [N] int64: the shared prompt of its group when sharing (tokens before the first target - 1)
    branch: np.ndarray  # [N] int64: its own tokens when sharing; 0 when it has no supervised token
    unencodable: dict[int, str]  # sample index -> why it cannot be encoded
    exact: bool  # False when the fast path disagreed with real encodings and every sample was encoded for real


def caption_tokens(table: SampleTable, processor, progress: bool = False) -> np.ndarray:
    """[N] the tokens of each caption sample's stretch of text (0 for other conversations): the slow part of
    `measure`, which needs no image, so it can run while the images are checked."""
    counts = np.zeros(len(table), np.int64)
    captions = np.flatnonzero(table.question_of >= 0)
    counts[captions] = _caption_tokens(table, captions, processor, progress)
    return counts


def measure(table: SampleTable, tiles: np.ndarray, processor, progress: bool = False,
            counted: np.ndarray | None = None) -> Lengths:
    """Lengths of every sample of `table`, whose images have `tiles[i]` tiles, as `processor` encodes them
    (`counted`: `caption_tokens` of the table, if already known)."""
    n = len(table)
    tpt = processor.tokens_per_tile
    lengths = Lengths(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64), {}, True)
    slow = np.flatnonzero(table.question_of < 0).tolist()
    fast = np.flatnonzero(table.question_of >= 0)
    if len(fast):
        constants = _question_constants(table, processor)
        on_fast = np.isin(table.question_of[fast], list(constants))
        slow += fast[~on_fast].tolist()
        fast = fast[on_fast]
        seg = counted[fast] if counted is not None else _caption_tokens(table, fast, processor, progress)
        base, pre, cb = (np.array([constants.get(q, (0, 0, 0))[j] for q in range(len(table.questions))], np.int64)
                         for j in range(3))
        q = table.question_of[fast]
        k = tiles[fast].astype(np.int64)
        lengths.total[fast] = base[q] + seg + k * tpt
        lengths.prefix[fast] = pre[q] + (k - 1) * tpt
        lengths.branch[fast] = seg + cb[q]
        if not _agrees(lengths, table, tiles, processor, fast):
            lengths.exact = False
            slow += fast.tolist()
    bar = tqdm(sorted(slow), desc="measuring samples", unit="sample", disable=not progress or len(slow) < 1000)
    for i in bar:
        try:
            lengths.total[i], lengths.prefix[i], lengths.branch[i] = _encoded(table, i, int(tiles[i]), processor)
        except CaptuneError as e:
            lengths.unencodable[i] = str(e)
    return lengths


def _encoded(table: SampleTable, i: int, tiles: int, processor) -> tuple[int, int, int]:
    """(total, prefix, branch) of sample i from a real encoding (one image token, then counted up)."""
    enc = encode_conversation(processor.tokenizer, list(table.conversations(i)), 1, processor.template)
    extra = tiles * processor.tokens_per_tile - 1
    span = supervised_span(enc["labels"])
    if span is None or span[0] == 0:
        return len(enc["input_ids"]) + extra, 0, 0
    first, last = span
    return len(enc["input_ids"]) + extra, first - 1 + extra, last - first + 1


def _question_constants(table: SampleTable, processor) -> dict[int, tuple[int, int, int]]:
    """Per question: (total - caption tokens - image tokens, prefix at one tile, branch - caption tokens), from its
    first sample encoded for real; questions whose sample cannot be encoded or has no target are left out."""
    questions, first = np.unique(table.question_of, return_index=True)
    constants = {}
    for q, i in zip(questions.tolist(), first.tolist(), strict=True):
        if q < 0:
            continue
        try:
            total, prefix, branch = _encoded(table, i, 1, processor)
        except CaptuneError:
            continue
        if branch == 0:
            continue
        seg = int(_caption_tokens(table, np.array([i]), processor, False)[0])
        constants[q] = (total - seg - processor.tokens_per_tile, prefix, branch - seg)
    return constants


def _answer_head(processor) -> str:
    """The text between the template's last special token before an answer and the answer ("assistant\\n")."""
    head = processor.template.assistant
    specials = [t for t in getattr(processor.tokenizer, "added_tokens_encoder", {}) if t and t in head]
    end = max((head.rfind(t) + len(t) for t in specials), default=0)
    return head[end:]


def _caption_tokens(table: SampleTable, indices: np.ndarray, processor, progress: bool) -> np.ndarray:
    """Tokens of "head + caption" for each sample, in batched tokenizer calls."""
    head, strip = _answer_head(processor), processor.template.strip_messages
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    counts = np.zeros(len(indices), np.int64)
    bar = tqdm(total=len(indices), desc="counting caption tokens", unit="caption",
               disable=not progress or len(indices) < 10_000)
    for start in range(0, len(indices), _CHUNK):
        texts = []
        for i in indices[start : start + _CHUNK].tolist():
            caption = table.caption(i)
            texts.append(head + (caption.strip() if strip else caption))
        if backend is not None:  # a fast tokenizer: the Rust batch call, without offsets
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            found = [len(e.ids) for e in encode(texts, add_special_tokens=False)]
        else:
            found = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
        counts[start : start + len(texts)] = found
        bar.update(len(texts))
    bar.close()
    return counts


def _agrees(lengths: Lengths, table: SampleTable, tiles: np.ndarray, processor, fast: np.ndarray) -> bool:
    """Whether real encodings of a few fast-path samples give the same counts (a sample whose real encoding has no
    target, the original's tokenization mismatch, may have a shorter branch than estimated: never a longer one)."""
    rng = random.Random(0)
    for i in rng.sample(fast.tolist(), min(_CHECKED, len(fast))):
        try:
            total, prefix, branch = _encoded(table, i, int(tiles[i]), processor)
        except CaptuneError:
            return False
        if total != lengths.total[i] or (branch and (prefix, branch) != (lengths.prefix[i], lengths.branch[i])):
            return False
    return True
