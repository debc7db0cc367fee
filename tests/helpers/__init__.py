"""Helpers shared by the tests (tiny checkpoints and caption sets, the shared-prefix setting): the only modules of
the test tree that tests import (`from helpers.tiny import ...`; `pythonpath` in pyproject.toml)."""
