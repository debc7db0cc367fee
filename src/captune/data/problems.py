"""What can be wrong with training data, counted by kind with the first few examples, and said in one line."""

from __future__ import annotations

from dataclasses import dataclass, field

# Problem kinds (singular; format_problems pluralises them).
MALFORMED_LINE = "malformed line"
MALFORMED_ENTRY = "malformed entry"
EMPTY_CAPTION = "empty caption"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
TRUNCATED_IMAGE = "truncated image"
OVER_LONG = "over-long sample"
UNENCODABLE = "unencodable sample"

_EXAMPLES_PER_KIND = 3


@dataclass
class Problems:
    """Problems counted by kind, with the first few examples of each ("file:line: reason")."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < _EXAMPLES_PER_KIND:
            kept.append(example)

    def update(self, other: Problems) -> None:
        for kind, count in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
            kept = self.examples.setdefault(kind, [])
            kept.extend(other.examples.get(kind, [])[: _EXAMPLES_PER_KIND - len(kept)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class SkipRecord(Exception):
    """A record that is not a usable sample: counted as a problem of `kind`, never fatal."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def format_problems(problems: Problems) -> str:
    """One line: "3 malformed lines (e.g. a; b; c), 2 missing images (e.g. ...)"."""
    if not problems.total:
        return "no problems"
    return ", ".join(f"{count} {_plural(kind, count)} (e.g. {'; '.join(problems.examples.get(kind, []))})"
                     for kind, count in problems.counts.items())


def _plural(kind: str, count: int) -> str:
    if count == 1:
        return kind
    return kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
