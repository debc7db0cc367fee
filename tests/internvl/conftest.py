"""Fixtures shared by the tokenizer tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tok_dir(fixtures):
    """The original InternVL2 tokenizer files (fixtures/tokenizer_internvl2)."""
    return fixtures / "tokenizer_internvl2"
