"""Training samples held compactly: a few numpy arrays instead of 566k Python objects.

A DataLoader worker is a forked copy of the training process. Python objects in a list are not read-only to a
fork: every access writes their reference count (and the garbage collector walks them), so each worker slowly
copies every page that holds one; with the tutorial's 566,747 captions as `Sample`s that is ~500 MB per worker,
growing through the epoch. Text in one byte buffer with integer offsets has nothing to touch: its pages stay
shared, and a worker's memory stays flat.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captune.data.samples import Sample

_CONVERSATION = -1  # question index of a sample stored as its whole conversation (JSON), not question + caption


@dataclass(frozen=True)
class Strings:
    """Strings in one UTF-8 buffer: `buffer[offsets[i]:offsets[i + 1]]` is string i."""

    buffer: np.ndarray  # [total bytes] uint8
    offsets: np.ndarray  # [n + 1] int64

    @classmethod
    def of(cls, strings: Sequence[str]) -> Strings:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class SampleTable:
    """The training samples: image and question of each sample as indices, captions as text.

    A sample of one question and one answer (COCO: every one) is kept as (question index, caption); any other
    conversation (a system turn, several turns) as its JSON. `table[i]` rebuilds the `Sample`.
    """

    images: Strings  # distinct absolute image paths
    questions: Strings  # distinct first human turns (with `<image>`)
    image_of: np.ndarray  # [N] int32: index into images
    question_of: np.ndarray  # [N] int32: index into questions, -1 = `answers[i]` is the whole conversation
    answers: Strings  # [N] the caption, or the conversation as JSON

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> SampleTable:
        images: dict[str, int] = {}
        questions: dict[str, int] = {}
        image_of = np.empty(len(samples), dtype=np.int32)
        question_of = np.empty(len(samples), dtype=np.int32)
        answers = []
        for i, s in enumerate(samples):
            image_of[i] = images.setdefault(str(s.image), len(images))
            turns = s.conversations
            if len(turns) == 2 and turns[0]["from"] == "human" and turns[1]["from"] == "gpt":
                question_of[i] = questions.setdefault(turns[0]["value"], len(questions))
                answers.append(turns[1]["value"])
            else:
                question_of[i] = _CONVERSATION
                answers.append(json.dumps(list(turns), ensure_ascii=False))
        return cls(Strings.of(list(images)), Strings.of(list(questions)), image_of, question_of, Strings.of(answers))

    def __len__(self) -> int:
        return len(self.image_of)

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.image(i), self.conversations(i))

    def image(self, i: int) -> Path:
        return Path(self.images[int(self.image_of[i])])

    def is_caption(self, i: int) -> bool:
        """One question and one answer (the prefix-sharing and fast-length case)."""
        return bool(self.question_of[i] != _CONVERSATION)

    def caption(self, i: int) -> str:
        """The answer of a caption sample."""
        return self.answers[i]

    def conversations(self, i: int) -> tuple[dict, ...]:
        q = int(self.question_of[i])
        if q == _CONVERSATION:
            return tuple(json.loads(self.answers[i]))
        return {"from": "human", "value": self.questions[q]}, {"from": "gpt", "value": self.answers[i]}

    @property
    def nbytes(self) -> int:
        parts = (self.images, self.questions, self.answers)
        return (sum(p.buffer.nbytes + p.offsets.nbytes for p in parts) + self.image_of.nbytes
                + self.question_of.nbytes)
