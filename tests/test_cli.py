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
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Annotated, Literal

import pytest

from captune import cli, cli_args, cli_sizing, devices
from captune.cli import build_parser, main
from captune.errors import CaptuneError, Interrupted
from captune.train.config import HELP, TrainConfig, recipe_values

COMMANDS = {("demo",), ("caption",), ("eval",), ("score",), ("train",), ("data", "coco"), ("data", "synthetic"),
            ("data", "check"), ("merge",), ("verify-merge",), ("bench", "eval"), ("bench", "train"), ("convert",),
            ("compare",), ("plan",)}


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
                 cli.data_check, cli.merge, cli.verify_merge, cli_sizing.bench_eval, cli_sizing.bench_train,
                 cli.convert, cli.compare, cli_sizing.plan):
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
    assert ("--batch-size SIZE images per batch (default 64 on a GPU, or the largest of 32, 16, 8 that fits; 4 on the "
            "CPU) --limit") in eval_help  # computed
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
def recorded(monkeypatch):
    """Every command function replaced by a recorder with its signature and docstring (devices checked as usual)."""
    made: list[tuple[str, tuple, dict]] = []
    for name in ("demo", "caption", "evaluate", "score", "train", "data_coco", "data_synthetic", "data_check",
                 "merge", "verify_merge", "bench_eval", "bench_train", "convert", "compare", "plan"):
        def record(*args, _name=name, **kwargs):
            made.append((_name, args, kwargs))

        module = cli_sizing if name in ("bench_eval", "bench_train", "plan") else cli
        monkeypatch.setattr(module, name, functools.wraps(getattr(module, name))(record))
    return made


@pytest.fixture
def calls(recorded, monkeypatch):
    """`recorded`, with any --device accepted (bench's default, cuda, on a machine without a GPU too)."""
    monkeypatch.setattr(devices, "check_device", lambda name, option="--device": name)
    return recorded


CALLS = [
    (["compare", "a", "b", "--out", "c.html"], "compare", {"run_a": Path("a"), "run_b": Path("b"), "out": Path("c.html")}),
    (["plan", "m", "--gpus", "8", "--gpu-memory", "80", "--json"], "plan",
     {"model": Path("m"), "gpus": 8, "gpu_memory": 80.0, "recipe": None, "json": True}),
    (["demo", "--out", "d", "--epochs", "2", "--force"], "demo",
     {"out": "d", "train_images": 200, "test_images": 50, "epochs": 2.0, "force": True}),
    (["caption", "m", "a.jpg", "b.jpg", "--max-tiles", "2", "--batch-size", "3", "--question", "q?"], "caption",
     {"model": "m", "images": ["a.jpg", "b.jpg"], "question": "q?", "max_tiles": 2, "max_new_tokens": 30,
      "min_new_tokens": 8, "batch_size": 3, "device": "auto", "dtype": "auto", "gpus_per_model": "auto",
      "compile": "auto"}),
    (["convert", "s", "o", "--to", "internvl", "--no-force"], "convert",
     {"src": Path("s"), "out": Path("o"), "to": "internvl", "force": False}),
    (["eval", "m", "--data", "d", "--limit", "5", "--spice", "--num-workers", "0", "--dtype", "fp32", "--compile",
      "on"], "evaluate",
     {"model": "m", "data": "d", "test_json": None, "gt_json": None, "image_root": None, "out": None, "max_tiles": 6,
      "batch_size": None, "limit": 5, "device": "auto", "dtype": "fp32", "spice": True, "num_workers": 0,
      "force": False, "gpus_per_model": "auto", "compile": "on"}),
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
    (["bench", "eval", "--images", "8", "--batch-sizes", "2,4", "--num-workers", "1", "--new-tokens", "5",
      "--profile"], "bench_eval",
     {"tokenizer": None, "images": 8, "baseline_images": 24, "batch_sizes": "2,4", "num_workers": 1, "new_tokens": 5,
      "agreement_images": 128, "profile": True, "device": "cuda", "out": None}),
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


# --------------------------------------------------------------------------------------- numbers checked when parsed

def _parse_error(argv: list[str], capsys) -> str:
    """The last line argparse printed for `captune ARGV` (which must exit with status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_every_numeric_option_of_every_command_has_a_range():
    unchecked = [f"{' '.join(path)} {a.option_strings}" for path, parser in _leaves().items() if path != ("train",)
                 for a in parser._actions if a.type in (int, float) and getattr(a, "rule", None) is None]
    assert not unchecked
    lists = {a.dest: a.rule for path in (("bench", "eval"), ("bench", "train")) for a in _options(_leaves()[path])
             if getattr(a, "rule", None)}
    assert lists["batch_sizes"].sep == "," and lists["token_budgets"].sep == ","  # "64,128": each number checked


BAD_NUMBERS = [  # the command line, its error (after "captune COMMAND: error: ")
    (["caption", "m", "i", "--max-tiles", "0"], "--max-tiles must be at least 1, got 0"),
    (["caption", "m", "i", "--max-tiles", "-2"], "--max-tiles must be at least 1, got -2"),
    (["eval", "m", "--max-tiles", "0"], "--max-tiles must be at least 1, got 0"),
    (["data", "check", "d", "--max-tiles", "0"], "--max-tiles must be at least 1, got 0"),
    (["eval", "m", "--limit", "-1"], "--limit must be at least 1, got -1"),
    (["eval", "m", "--limit", "0"], "--limit must be at least 1, got 0"),
    (["eval", "m", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["caption", "m", "i", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["caption", "m", "i", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["caption", "m", "i", "--min-new-tokens", "-1"], "--min-new-tokens must be at least 0, got -1"),
    (["caption", "m", "i", "--max-new-tokens", "5"], "--min-new-tokens must be at most --max-new-tokens (5), got 8"),
    (["eval", "m", "--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
    (["eval", "m", "--workers", "-1"], "--num-workers must be at least 0, got -1"),  # an old spelling, same rule
    (["data", "check", "d", "--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
    (["data", "check", "d", "--max-seq-length", "0"], "--max-seq-length must be at least 1, got 0"),
    (["data", "synthetic", "o", "--train-images", "0"], "--train-images must be at least 1, got 0"),
    (["data", "synthetic", "o", "--train", "0"], "--train-images must be at least 1, got 0"),
    (["data", "synthetic", "o", "--test-images", "0"], "--test-images must be at least 1, got 0"),
    (["data", "synthetic", "o", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["data", "synthetic", "o", "--style", "-1"], "--style must be at least 0, got -1"),
    (["data", "synthetic", "o", "--image-size", "27"], "--image-size must be at least 28, got 27"),
    (["demo", "--train-images", "7"], "--train-images must be at least 8, got 7"),
    (["demo", "--test-images", "0"], "--test-images must be at least 1, got 0"),
    (["demo", "--epochs", "0"], "--epochs must be greater than 0, got 0.0"),
    (["demo", "--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["bench", "eval", "--images", "0"], "--images must be at least 1, got 0"),
    (["bench", "eval", "--baseline-images", "0"], "--baseline-images must be at least 1, got 0"),
    (["bench", "eval", "--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
    (["bench", "eval", "--batch-sizes", "64,0"], "--batch-sizes must be at least 1, got 0"),
    (["bench", "eval", "--batch-sizes", "64,x"], "--batch-sizes must be whole numbers separated by ',', got '64,x'"),
    (["bench", "train", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["bench", "train", "--token-budgets", "-8"], "--token-budgets must be at least 1, got -8"),
]


@pytest.mark.parametrize("argv,message", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_a_number_out_of_range_is_an_argparse_error_naming_the_option(calls, capsys, argv, message):
    command = " ".join(argv[:2] if argv[0] in ("data", "bench") else argv[:1])
    assert _parse_error(argv, capsys) == f"captune {command}: error: {message}"
    assert calls == []  # before the command starts


def test_numbers_at_the_edge_of_their_range_are_accepted(calls):
    for argv in (["caption", "m", "i", "--max-tiles", "1", "--min-new-tokens", "0", "--max-new-tokens", "1",
                  "--batch-size", "1"],
                 ["caption", "m", "i", "--min-new-tokens", "30", "--max-new-tokens", "30"],
                 ["eval", "m", "--limit", "1", "--num-workers", "0", "--batch-size", "1", "--max-tiles", "1"],
                 ["data", "synthetic", "o", "--seed", "0", "--style", "0", "--image-size", "28", "--train-images", "1"],
                 ["demo", "--train-images", "8", "--epochs", "0.5"], ["bench", "eval", "--batch-sizes", "1, 2"]):
        assert main(argv) == 0, argv
    assert len(calls) == 6


def test_range_of_a_generated_command():
    def command(rate: Annotated[float, cli_args.Range(0, 1, max_open=True)] = 0.5,
                sizes: list[cli_args.AtLeast1] | None = None) -> None:
        """Summary.

        Args:
            rate: the rate
            sizes: the sizes
        """

    parser = cli_args.Parser(prog="p")
    cli_args.add_command(parser.add_subparsers(dest="c"), "c", command)
    assert parser.parse_args(["c", "--rate", "0"]).rate == 0.0
    for argv, message in ((["c", "--rate", "1"], "--rate must be at least 0 and less than 1, got 1.0"),
                          (["c", "--rate", "nan"], "--rate must be a finite number, got nan")):
        err = io.StringIO()
        with pytest.raises(SystemExit), redirect_stderr(err):
            parser.parse_args(argv)
        assert err.getvalue().strip().endswith(f"p c: error: {message}")


# ----------------------------------------------------------------------------------------------------- train's rules

def test_every_numeric_train_option_has_a_rule():
    from captune.train import config

    hints = typing.get_type_hints(TrainConfig)
    numeric = {name for name, kind in hints.items() if kind in (int, float) or typing.get_origin(kind) is tuple}
    assert numeric == set(config.RANGES) | {"max_steps", "adam_betas"}  # those two have rules of their own


def _bad_train_values():
    from captune.train import config

    for name, (low, high, low_open, high_open) in config.RANGES.items():
        yield name, str(low if low_open else low - 1)
        if high is not None:
            yield name, str(high if high_open else high + 1)
    yield "max_steps", "0"
    yield "max_steps", "-2"
    yield "adam_betas", "0.9"
    yield "adam_betas", "0.9,1.0"


@pytest.mark.parametrize("name,value", list(_bad_train_values()), ids=lambda v: str(v))
def test_train_rules_name_the_option_as_typed(name, value):
    from captune.train import config

    option = "--" + name.replace("_", "-")
    with pytest.raises(CaptuneError) as error:
        config.resolve("demo_lora", {"model": "m", "data": "d", "out": "o", name: value})
    assert str(error.value).startswith(f"{option} must be ") and "_" not in str(error.value)


def test_train_values_at_the_edge_are_accepted():
    from captune.train import config

    edges = {"lora_dropout": "0", "warmup_ratio": "1", "weight_decay": "0", "seed": "0", "num_workers": "0",
             "keep_checkpoints": "0", "eval_every": "0", "max_steps": "1", "adam_betas": "0,0.999"}
    resolved = config.resolve("demo_lora", {"model": "m", "data": "d", "out": "o", **edges})
    assert (resolved.keep_checkpoints, resolved.max_steps, resolved.adam_betas) == (0, 1, (0.0, 0.999))


def test_train_errors_on_the_command_line_name_the_option(monkeypatch, capsys):
    import captune.train.loop

    started = []
    monkeypatch.setattr(captune.train.loop, "train", lambda config: started.append(config))
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--lora-rank", "0"]) == 2
    assert capsys.readouterr().err == "captune: error: --lora-rank must be at least 1, got 0\n"
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--device", "cpux"]) == 2
    assert capsys.readouterr().err == "captune: error: --device must be auto, cpu, cuda or cuda:N, not 'cpux'\n"
    assert started == []


def test_unknown_train_keys_are_named_as_typed():
    from captune.train import config

    with pytest.raises(CaptuneError, match=r"^unknown option '--lora-rnk'; did you mean --lora-rank, "):
        config.apply(TrainConfig(), {"lora_rnk": "4"})  # the command line's overrides
    with pytest.raises(CaptuneError, match=r"^unknown option 'lora_rnk' in recipe r; did you mean lora_rank, "):
        config.apply(TrainConfig(), {"lora_rnk": 4}, where="recipe r")  # a recipe file's key, as written there
    with pytest.raises(CaptuneError, match=r"^lora_rank in recipe r: 'big' is not a valid int"):
        config.apply(TrainConfig(), {"lora_rank": "big"}, where="recipe r")


# ------------------------------------------------------------------------------------------ unknown options, devices

@pytest.mark.parametrize("argv,unknown,hint", [
    (["train", "--lora-rnk", "4"], "--lora-rnk 4", "--lora-rank"),
    (["caption", "m", "i", "--max-tils", "2"], "--max-tils 2", "--max-tiles"),
    (["eval", "m", "--wokers", "2"], "--wokers 2", "--num-workers"),  # not the hidden --workers
    (["data", "check", "d", "--max-seq-lenght=9"], "--max-seq-lenght=9", "--max-seq-length"),
])
def test_an_unknown_option_shows_the_commands_usage_and_the_closest_option(calls, capsys, argv, unknown, hint):
    command = " ".join(argv[:2] if argv[0] == "data" else argv[:1])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"usage: captune {command} ")  # the command's, not captune's
    assert err.strip().splitlines()[-1] == \
        f"captune {command}: error: unrecognized arguments: {unknown} (did you mean {hint}?)"
    assert calls == []


def test_an_unknown_argument_without_a_close_option(capsys):
    last = _parse_error(["score", "r", "g", "extra"], capsys)
    assert last == "captune score: error: unrecognized arguments: extra"


DEVICE_COMMANDS = [["caption", "m", "i"], ["eval", "m"], ["merge", "a", "o"], ["verify-merge", "a", "m"],
                   ["bench", "eval"], ["bench", "train"], ["train"]]


def test_every_command_with_a_device_is_checked():
    with_device = {path for path, parser in _leaves().items() if "device" in {a.dest for a in _options(parser)}}
    assert with_device == {tuple(a[:2]) if a[0] == "bench" else (a[0],) for a in DEVICE_COMMANDS}


@pytest.mark.parametrize("argv", DEVICE_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_bad_device_is_one_line_before_any_work(recorded, capsys, monkeypatch, argv):
    assert main([*argv, "--device", "cpux"]) == 2
    assert capsys.readouterr().err == "captune: error: --device must be auto, cpu, cuda or cuda:N, not 'cpux'\n"
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    assert main([*argv, "--device", "cuda"]) == 2  # merge --device cuda: before loading, merging and saving
    assert capsys.readouterr().err.startswith("captune: error: --device cuda: no CUDA GPU is available")
    assert recorded == []


# ------------------------------------------------------------------------------------------ --version, Ctrl-C, demo

def test_version(capsys, monkeypatch):
    from importlib import metadata

    import captune

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"captune {metadata.version('captune')}\n"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a source tree on sys.path
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"captune {captune.__version__}\n"


@pytest.mark.parametrize("raised,line", [
    (Interrupted("kept 120 captions in runs/eval; run the same command again to resume"),
     "captune: interrupted: kept 120 captions in runs/eval; run the same command again to resume\n"),
    (KeyboardInterrupt(), "captune: interrupted\n"),
], ids=["Interrupted", "KeyboardInterrupt"])
def test_ctrl_c_is_one_line_and_exit_status_130(monkeypatch, capsys, raised, line):
    def interrupted(*args, **kwargs):
        raise raised

    monkeypatch.setattr(cli, "score", functools.wraps(cli.score)(interrupted))
    assert main(["score", "r", "g"]) == 130
    assert capsys.readouterr().err == line


def test_demo_help_and_readme_give_the_same_duration():
    text = _help_of(("demo",))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    make_demo = next(line for line in readme.splitlines() if line.startswith("make demo "))
    assert "about a minute on 2 cores" in text and "about a minute on 2 cores" in make_demo
    assert "few minutes" not in text
