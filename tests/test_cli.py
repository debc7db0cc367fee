"""The command line: every option of every command explains itself, and `train --help` shows the values that will
apply (the recipe's, not the config class's)."""

from __future__ import annotations

import argparse
import re

import pytest

from captune.cli import build_parser, main
from captune.train.config import HELP, TrainConfig, recipe_values


def _commands(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_option_of_every_command_has_help():
    missing = [f"{' '.join(path)} {a.option_strings or a.dest}" for path, p in _commands(build_parser())
               for a in p._actions if not isinstance(a, argparse._SubParsersAction) and a.dest != "help" and not a.help]
    assert not missing


def test_every_train_option_has_a_help_line():
    assert set(HELP) == {f for f in TrainConfig.__dataclass_fields__}


def _train_help(capsys, *args) -> str:
    with pytest.raises(SystemExit):
        main(["train", *args, "--help"])
    return re.sub(r"\s+", " ", capsys.readouterr().out.split("options:")[1])


def test_train_help_shows_the_recipes_values(capsys):
    text = _train_help(capsys)
    recipe = recipe_values(None)
    assert recipe.token_budget != TrainConfig.token_budget  # the recipe differs from the class, so this has teeth
    assert f"internvl2_2b_coco_lora: {recipe.token_budget})" in text
    assert "internvl2_2b_coco_lora: False)" in text.split("--gradient-checkpointing")[1][:200]
    assert "(required)" in text.split("--model MODEL")[1][:200]
    assert "(default )" not in text


def test_train_help_follows_the_recipe_on_the_command_line(capsys):
    text = _train_help(capsys, "--recipe", "demo_lora")
    assert f"(demo_lora: {recipe_values('demo_lora').learning_rate})" in text


def test_other_commands_show_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default 6)" in capsys.readouterr().out


def test_wrong_value_names_the_option(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--lora-rank", "big"])
    assert code == 2 and "--lora-rank: 'big' is not a valid int" in capsys.readouterr().err
