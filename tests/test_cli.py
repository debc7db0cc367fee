"""The command line, generated from the command functions' signatures and docstrings: every option of every command
explains itself and shows the default that applies, `train --help` shows the recipe's values (not the config
class's), booleans are --x/--no-x, arguments reach the functions with their types, old spellings still parse."""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Literal

import pytest

from captune import cli, cli_args
from captune.cli import build_parser, main
from captune.errors import CaptuneError
from captune.train.config import HELP, TrainConfig, recipe_values

COMMANDS = {("demo",), ("caption",), ("eval",), ("score",), ("train",), ("data", "coco"), ("data", "synthetic"),
            ("data", "check"), ("merge",), ("verify-merge",), ("bench", "eval"), ("bench", "train"), ("convert",)}


def _commands(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _leaves() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    return {path: p for path, p in _commands(build_parser()) if "func" in p._defaults}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _help(*argv: str) -> str:
    """The options part of `captune ARGV --help` (after the usage line), whitespace made single spaces."""
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_, redirect_stdout(out):
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return re.sub(r"\s+", " ", out.getvalue().split("options:")[1])


@functools.cache
def _help_of(path: tuple[str, ...]) -> str:
    return re.sub(r"\s+", " ", _leaves()[path].format_help())


# ------------------------------------------------------------------------------------------------------ help texts

def test_every_command_is_there():
    assert set(_leaves()) == COMMANDS


def test_every_option_of_every_command_has_help():
    missing = [f"{' '.join(path)} {a.option_strings or a.dest}" for path, p in _commands(build_parser())
               for a in p._actions if not isinstance(a, argparse._SubParsersAction) and a.dest != "help"
               and not (a.help or "").strip()]
    assert not missing
    assert all(p.description for p in _leaves().values())


def test_a_parameter_without_a_help_line_is_an_error():
    def documented(data: str, limit: int = 3) -> None:
        """Summary.

        Args:
            data: the data
            limit: at most
                this many (a wrapped line)
        """

    def undocumented(data: str, limit: int = 3) -> None:
        """Summary.

        Args:
            data: the data
        """

    def stale(data: str) -> None:
        """Summary.

        Args:
            data: the data
            gone: a parameter that is no more
        """

    sub = argparse.ArgumentParser().add_subparsers()
    assert cli_args.parse_docstring(documented) == (
        "Summary.", "", {"data": "the data", "limit": "at most this many (a wrapped line)"})
    cli_args.add_command(sub, "documented", documented)
    for func in (undocumented, stale):
        with pytest.raises(TypeError, match="one 'name: help' line per parameter"):
            cli_args.add_command(sub, func.__name__, func)


def test_every_command_function_documents_every_parameter():
    for path, parser in _leaves().items():
        func = parser._defaults["func"]
        assert callable(func), path
    for func in (cli.demo, cli.caption, cli.evaluate, cli.score, cli.train, cli.data_coco, cli.data_synthetic,
                 cli.data_check, cli.merge, cli.verify_merge, cli.bench_eval, cli.bench_train, cli.convert):
        cli_args.checked_helps(func, inspect.signature(func).parameters)  # raises if one is missing


def test_every_train_option_has_a_help_line():
    assert set(HELP) == {f for f in TrainConfig.__dataclass_fields__}
    options = {a.dest for a in _options(_leaves()[("train",)])}
    assert options == set(HELP)


def test_help_shows_the_default_that_applies_and_no_noise():
    for path in COMMANDS:
        text = _help_of(path)
        assert "(default )" not in text and "(default None)" not in text and "default: None" not in text, path
        assert "(default: False)" not in text and "(default: True)" not in text, path  # argparse's own, not ours
    eval_help = _help_of(("eval",))
    assert "--max-tiles TILES dynamic tiling: at most this many tiles (+ a thumbnail) (default 6)" in eval_help
    assert "--batch-size SIZE images per batch (default 64 on a GPU, 4 on the CPU) --limit" in eval_help  # computed
    assert "--verify, --no-verify check the merged logits" in _help_of(("merge",))
    assert "(default true)" in _help_of(("merge",)).split("--verify, --no-verify")[1][:200]
    assert "--force, --no-force replace a non-empty OUT (default false)" in _help_of(("convert",))
    assert "--dtype {bf16,fp16,fp32} dtype of the merged weights (default bf16)" in _help_of(("merge",))
    assert "(default 16384)" in _help_of(("bench", "train")) and "(default 8.0)" in _help_of(("demo",))


def test_required_options_say_required():
    text = _help_of(("data", "coco")).split("options:")[1]
    for option in ("--karpathy KARPATHY", "--image-root ROOT", "--out OUT"):
        assert "(required)" in text.split(option)[1][:120], option
    assert _leaves()[("data", "coco")]._option_string_actions["--karpathy"].required
    for option in ("--model MODEL", "--data DATA", "--out OUT"):
        assert "(required)" in _help("train").split(option)[1][:250], option


def test_the_same_concept_has_the_same_option_name_in_every_command():
    names = {}
    for parser in _leaves().values():
        for action in _options(parser):
            names.setdefault(action.dest, set()).add(action.option_strings[0])
    for dest in ("model", "num_workers", "max_tiles", "device", "dtype", "batch_size", "out", "force", "image_root"):
        assert names[dest] == {"--" + dest.replace("_", "-")}, (dest, names[dest])
    assert "workers" not in names  # bench eval once kept it under another name


# ------------------------------------------------------------------------------------------------------- train help

def test_train_help_shows_the_recipes_values():
    text = _help("train")
    recipe = recipe_values(None)
    assert recipe.token_budget != TrainConfig.token_budget  # the recipe differs from the class, so this has teeth
    assert recipe.token_budget == 16384
    assert "--token-budget BUDGET tokens per packed micro-batch" in text
    assert f"(internvl2_2b_coco_lora: {recipe.token_budget})" in text.split("--token-budget")[1][:200]
    assert "(internvl2_2b_coco_lora: false)" in text.split("--gradient-checkpointing [BOOL], --no-gradient")[1][:200]
    assert "(required)" in text.split("--model MODEL")[1][:200]
    assert "(default )" not in text and "(unset)" not in text.split("--eval-data")[1][:200]


def test_train_help_follows_the_recipe_on_the_command_line():
    for argv in (["--recipe", "demo_lora"], ["--recipe=demo_lora"]):
        text = _help("train", *argv)
        assert f"(demo_lora: {recipe_values('demo_lora').learning_rate})" in text
        assert "(demo_lora: 4096)" in text.split("--token-budget")[1][:200]


def test_train_help_with_an_unknown_recipe_still_shows():
    assert "(nope: 8192)" in _help("train", "--recipe", "nope").split("--token-budget")[1][:200]


# -------------------------------------------------------------------------------------------------------- booleans

def _minimal_argv(path: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    """The command with placeholder positionals and required options."""
    argv = list(path)
    for action in parser._actions:
        if not action.option_strings:
            argv.append("x")
        elif action.required:
            argv += [action.option_strings[0], "x"]
    return argv


def test_booleans_accept_flag_and_no_flag():
    seen = 0
    for path, parser in _leaves().items():
        for action in _options(parser):
            if isinstance(action, (argparse.BooleanOptionalAction, cli_args.FlagOrValue)):
                flag, no = action.option_strings[0], "--no-" + action.option_strings[0][2:]
                argv = _minimal_argv(path, parser)
                on, off = (vars(build_parser(argv).parse_args([*argv, f]))[action.dest] for f in (flag, no))
                assert (on, off) in ((True, False), ("true", "false")), (path, flag, on, off)
                seen += 1
    assert seen >= 13  # demo, convert, eval, score, synthetic, merge (2), bench train, train's 6


def test_train_booleans_also_take_a_value():
    parse = build_parser().parse_args
    assert parse(["train", "--fsdp", "true"]).fsdp == "true"
    assert parse(["train", "--fsdp", "false"]).fsdp == "false"
    assert parse(["train", "--fsdp=no"]).fsdp == "no"
    assert parse(["train", "--fsdp", "--no-lora-vision"]).fsdp == "true"
    assert parse(["train"]).fsdp is None  # not given: the recipe's value
    with pytest.raises(SystemExit), redirect_stderr(io.StringIO()):
        parse(["train", "--no-fsdp", "true"])


# ------------------------------------------------------------------------------------------ arguments reach functions

@pytest.fixture
def calls(monkeypatch):
    """Every command function replaced by a recorder with its signature and docstring."""
    made: list[tuple[str, tuple, dict]] = []
    for name in ("demo", "caption", "evaluate", "score", "train", "data_coco", "data_synthetic", "data_check",
                 "merge", "verify_merge", "bench_eval", "bench_train", "convert"):
        def record(*args, _name=name, **kwargs):
            made.append((_name, args, kwargs))

        monkeypatch.setattr(cli, name, functools.wraps(getattr(cli, name))(record))
    return made


CALLS = [
    (["demo", "--out", "d", "--epochs", "2", "--force"], "demo",
     {"out": "d", "train_images": 200, "test_images": 50, "epochs": 2.0, "force": True}),
    (["caption", "m", "a.jpg", "b.jpg", "--max-tiles", "2", "--batch-size", "3", "--question", "q?"], "caption",
     {"model": "m", "images": ["a.jpg", "b.jpg"], "question": "q?", "max_tiles": 2, "max_new_tokens": 30,
      "min_new_tokens": 8, "batch_size": 3, "device": "auto", "dtype": "auto"}),
    (["convert", "s", "o", "--to", "internvl", "--no-force"], "convert",
     {"src": Path("s"), "out": Path("o"), "to": "internvl", "force": False}),
    (["eval", "m", "--data", "d", "--limit", "5", "--spice", "--num-workers", "0", "--dtype", "fp32"], "evaluate",
     {"model": "m", "data": "d", "test_json": None, "gt_json": None, "image_root": None, "out": None, "max_tiles": 6,
      "batch_size": None, "limit": 5, "device": "auto", "dtype": "fp32", "spice": True, "num_workers": 0,
      "force": False}),
    (["score", "r.json", "gt.json", "--out", "m.json"], "score",
     {"results": "r.json", "gt": "gt.json", "spice": False, "out": "m.json"}),
    (["data", "coco", "--karpathy", "k.json", "--image-root", "img", "--out", "ann"], "data_coco",
     {"karpathy": Path("k.json"), "image_root": Path("img"), "out": Path("ann")}),
    (["data", "synthetic", "o", "--train-images", "4", "--test-images", "2", "--image-size", "64"], "data_synthetic",
     {"out": Path("o"), "train_images": 4, "test_images": 2, "seed": 0, "style": 0, "image_size": 64, "force": False}),
    (["data", "check", "d", "--model", "m", "--num-workers", "2", "--max-seq-length", "100"], "data_check",
     {"data": Path("d"), "model": Path("m"), "max_tiles": 6, "max_seq_length": 100, "num_workers": 2,
      "image_root": None}),
    (["merge", "a", "o", "--format", "both", "--dtype", "fp32", "--no-verify", "--base", "b"], "merge",
     {"adapter": "a", "out": "o", "format": "both", "dtype": "fp32", "force": False, "base": "b", "verify": False,
      "device": "auto"}),
    (["verify-merge", "a", "m", "--device", "cpu"], "verify_merge",
     {"adapter": "a", "merged": "m", "base": None, "device": "cpu"}),
    (["bench", "eval", "--images", "8", "--batch-sizes", "2,4", "--num-workers", "1"], "bench_eval",
     {"tokenizer": None, "images": 8, "baseline_images": 24, "batch_sizes": "2,4", "num_workers": 1, "device": "cuda",
      "out": None}),
    (["bench", "train", "--token-budgets", "4096", "--brief", "--steps", "2"], "bench_train",
     {"tokenizer": None, "steps": 2, "token_budgets": "4096", "device": "cuda", "out": None, "brief": True}),
]


@pytest.mark.parametrize("argv,name,expected", CALLS, ids=[" ".join(c[0][:2]) for c in CALLS])
def test_arguments_reach_the_function_with_their_types(calls, argv, name, expected):
    assert main(argv) == 0
    assert len(calls) == 1
    called, args, kwargs = calls[0]
    assert (called, args) == (name, ())
    assert kwargs == expected
    assert {k: type(v) for k, v in kwargs.items()} == {k: type(v) for k, v in expected.items()}


def test_every_command_is_covered_by_the_call_table():
    assert {tuple(a[:2]) if a[0] in ("data", "bench") else (a[0],) for a, _, _ in CALLS} == COMMANDS - {("train",)}


def test_train_gets_the_recipe_and_the_options_typed(calls):
    assert main(["train", "--recipe", "demo_lora", "--model", "m", "--data", "d", "--out", "o", "--lora-rank", "4",
                 "--lora-vision", "--no-gradient-checkpointing", "--fsdp", "false", "--adam-betas", "0.9,0.95"]) == 0
    assert calls == [("train", ("demo_lora", {"model": "m", "data": "d", "out": "o", "lora_rank": "4",
                                              "lora_vision": "true", "gradient_checkpointing": "false",
                                              "fsdp": "false", "adam_betas": "0.9,0.95"}), {})]


# ----------------------------------------------------------------------------------------- old spellings still parse

ALIASES = [  # (command, its other arguments, old spelling, value, parameter, parsed value)
    (("data", "check"), ["d"], "--workers", "3", "num_workers", 3),
    (("eval",), ["m"], "--workers", "3", "num_workers", 3),
    (("bench", "eval"), [], "--workers", "3", "num_workers", 3),
    (("train",), [], "--workers", "3", "num_workers", "3"),
    (("data", "coco"), ["--karpathy", "k", "--out", "o"], "--images", "img", "image_root", Path("img")),
    (("data", "synthetic"), ["o"], "--train", "7", "train_images", 7),
    (("data", "synthetic"), ["o"], "--test", "7", "test_images", 7),
    (("bench", "train"), [], "--budgets", "8192", "token_budgets", "8192"),
]


@pytest.mark.parametrize("path,argv,old,value,dest,parsed", ALIASES, ids=[f"{' '.join(a[0])} {a[2]}" for a in ALIASES])
def test_hidden_aliases_still_parse_and_stay_hidden(path, argv, old, value, dest, parsed):
    argv = [*path, *argv, old, value]
    assert getattr(build_parser(argv).parse_args(argv), dest) == parsed
    assert not re.search(rf"{old}\b(?!-)", _help_of(path)), old


def test_old_spellings_reach_the_function(calls):
    assert main(["data", "coco", "--karpathy", "k", "--images", "img", "--out", "o"]) == 0
    assert main(["merge", "a", "o", "--no-verify"]) == 0
    assert calls[0][2]["image_root"] == Path("img") and calls[1][2]["verify"] is False


# ------------------------------------------------------------------------------------------------- errors, -m captune

def test_user_errors_are_one_line_and_exit_status_2(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise CaptuneError("no such folder", "nowhere")

    monkeypatch.setattr(cli, "score", functools.wraps(cli.score)(broken))
    assert main(["score", "r", "g"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captune: error: ") and err.count("\n") == 1


def test_wrong_value_names_the_option(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--lora-rank", "big"])
    assert code == 2 and "--lora-rank: 'big' is not a valid int" in capsys.readouterr().err


def test_literal_choices_and_types_are_checked_by_the_parser(capsys):
    for argv in (["merge", "a", "o", "--format", "zip"], ["caption", "m", "i", "--max-tiles", "many"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser(argv).parse_args(argv)
        assert exit_.value.code == 2
    assert "invalid choice: 'zip'" in capsys.readouterr().err


def test_literal_and_list_types():
    def command(mode: Literal["a", "b"], names: list[str], *, root: Path, sizes: list[int] | None = None) -> None:
        """Summary.

        Args:
            mode: the mode
            names: the names
            root: the root
            sizes: the sizes
        """

    parser = argparse.ArgumentParser()
    cli_args.add_command(parser.add_subparsers(dest="c"), "c", command)
    args = parser.parse_args(["c", "b", "x", "y", "--root", "r", "--sizes", "1", "2"])
    assert (args.mode, args.names, args.root, args.sizes) == ("b", ["x", "y"], Path("r"), [1, 2])


def test_python_dash_m_captune():
    run = subprocess.run([sys.executable, "-m", "captune", "data", "check", "--help"], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0 and "--num-workers" in run.stdout
