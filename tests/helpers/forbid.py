"""Make work that must not start fail loudly: a check that should refuse first is tested by forbidding what follows."""

from __future__ import annotations


def forbid(monkeypatch, targets: list[str], why: str) -> None:
    """Replace each dotted `target` with a function that fails the test with `why`."""

    def fail(*args, **kwargs):
        raise AssertionError(why)

    for target in targets:
        monkeypatch.setattr(target, fail)
