"""One command-line convention (contract.cli): a usage error is one line on stderr naming the flag or
file, and exit status 2, for every `python -m <package>` and benchmark entry point."""
from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest

from contract.cli import ArgumentParser, UsageError, at_least, parse, run


class Unreadable(Exception):
    pass


def program() -> ArgumentParser:
    p = ArgumentParser(prog="thing")
    sub = p.add_subparsers(dest="command", required=True)
    go = sub.add_parser("go")
    go.add_argument("--count", type=at_least(1), default=1)
    go.add_argument("--fail", choices=("usage", "declared", "bug", "status"))
    go.set_defaults(func=_go)
    return p


def _go(args: argparse.Namespace) -> int | None:
    if args.fail == "usage":
        raise UsageError("--fail: asked to\nover two lines")
    if args.fail == "declared":
        raise Unreadable("data.bin: unreadable")
    if args.fail == "bug":
        raise KeyError("a bug")
    return 3 if args.fail == "status" else None


@pytest.mark.parametrize("argv, status, needle", [
    (["go"], 0, None),
    (["go", "--fail", "status"], 3, None),
    (["go", "--count", "0"], 2, "argument --count: must be >= 1"),
    (["go", "--count", "x"], 2, "--count: 'x' is not an integer"),
    (["go", "--nope"], 2, "unrecognized arguments: --nope"),
    (["went"], 2, "invalid choice: 'went'"),
    ([], 2, "required: command"),
    (["go", "--fail", "usage"], 2, "--fail: asked to over two lines"),
    (["go", "--fail", "declared"], 2, "data.bin: unreadable"),
])
def test_run_dispatches_and_turns_usage_errors_into_one_line_and_status_2(argv, status, needle, capsys):
    assert run(program(), argv, user_errors=(Unreadable,)) == status
    err = capsys.readouterr().err
    if needle is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_a_bug_keeps_its_traceback_and_an_undeclared_error_is_not_a_usage_error():
    with pytest.raises(KeyError):
        run(program(), ["go", "--fail", "bug"])
    with pytest.raises(Unreadable):
        run(program(), ["go", "--fail", "declared"])


def test_validate_runs_between_parsing_and_the_command(capsys):
    def validate(args):
        if args.count > 5:
            raise UsageError("--count must be <= 5")
    assert run(program(), ["go", "--count", "6"], validate=validate) == 2
    assert capsys.readouterr().err == "error: --count must be <= 5\n"


def test_parse_exits_2_with_one_line(capsys):
    p = ArgumentParser()
    p.add_argument("--n", type=int)
    assert parse(p, ["--n", "4"]).n == 4
    with pytest.raises(SystemExit) as stop:
        parse(p, ["--n", "four"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'four'\n"


# Every program's own usage errors: (module, argv, what the message must name). Each stops before it
# touches a server, a corpus or a model.
PROGRAMS = [
    ("models.__main__", ["evaluate", "--config", "tiny", "--checkpoint", "{tmp}/none.safetensors"],
     "none.safetensors"),
    ("models.__main__", ["simulate", "--config", "tiny", "--clients-per-round", "0"], "--clients-per-round"),
    ("models.__main__", ["corpus", "--vocabulary", "nope"], "--vocabulary"),
    ("tflite_export.__main__", ["plan", "--checkpoint", "c", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ("tflite_export.__main__", ["verify", "{tmp}/none.manifest.json"], "none.manifest.json"),
    ("device_runtime.__main__", ["status", "--data", "{tmp}/missing"], "--data"),
    ("device_runtime.__main__", ["status", "--data", "{tmp}", "--last", "0"], "--last"),
    ("server.__main__", ["status", "--config", "{tmp}/none.toml"], "none.toml"),
    ("server.__main__", ["revoke", "--config", "{tmp}/none.toml"], "--device"),
    ("emulation.__main__", ["fleet", "--server", "http://127.0.0.1:9", "--data", "{tmp}", "--phones", "0"],
     "--phones"),
    ("emulation.__main__", ["fleet", "--server", "http://127.0.0.1:9", "--data", "{tmp}"], "--server-config"),
    ("emulation.__main__", ["fleet", "--server", "http://127.0.0.1:9", "--data", "{tmp}",
                            "--server-config", "{tmp}/none.toml"], "none.toml"),
    ("emulation.__main__", ["tiny-model", "--out", "{tmp}/file"], "--out"),
    ("emulation.__main__", ["personalize", "--checkpoint", "c", "--epochs", "-1"], "--epochs"),
    ("deploy.__main__", ["up", "--dir", "{tmp}", "--config", "{tmp}/none.toml"], "none.toml"),
    ("deploy.__main__", ["up", "--dir", "{tmp}", "--config", "{tmp}/file", "--replicas", "0"], "--replicas"),
    ("deploy.__main__", ["down", "--dir", "{tmp}"], "--dir"),
    ("benchmarks.export", ["--train-steps", "5"], "--train-steps"),
    ("benchmarks.device", ["--bogus"], "--bogus"),
    ("benchmarks.fleet", ["--phones", "many"], "--phones"),
    ("benchmarks.server", ["--workers", "two"], "--workers"),
    ("benchmarks.scale", ["--reports", "x"], "--reports"),
]


@pytest.mark.parametrize("module, argv, needle", PROGRAMS, ids=[f"{m.split('.')[0]}:{a[0]}" for m, a, _ in PROGRAMS])
def test_every_program_names_the_flag_or_file_and_exits_2(module, argv, needle, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    main = importlib.import_module(module).main
    try:
        status = main([a.format(tmp=tmp_path) for a in argv])
    except SystemExit as e:       # a benchmark that parses and goes on by itself exits (contract.cli.parse)
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and needle in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err


def test_a_benchmark_config_flag_of_the_wrong_type_exits_2(monkeypatch, capsys):
    from benchmarks import parse_config

    @dataclasses.dataclass(frozen=True)
    class Config:
        rounds: int = 3

    monkeypatch.setattr("sys.argv", ["bench", "--rounds", "three"])
    with pytest.raises(SystemExit) as stop:
        parse_config(Config, "a benchmark")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: argument --rounds: invalid int value: 'three'\n"


def test_the_fleet_seed_seeds_the_fleet_and_tampers_with_nothing(tmp_path):
    """`--seed N` once reached `Faults` positionally as its tamper fraction: every upload tampered with."""
    from emulation.__main__ import build_parser, fleet_config
    from emulation.world import Faults

    args = build_parser().parse_args([
        "fleet", "--server", "http://127.0.0.1:9", "--data", str(tmp_path), "--seed", "7",
        "--clock-start", "0", "--clock-speed", "60", "--clock-epoch", "0",
        "--unplug-fraction", "0.25", "--upload-failure-fraction", "0.5", "--network-error-rate", "0.125"])
    config = fleet_config(args)
    assert config.faults == Faults(unplug_fraction=0.25, upload_failure_fraction=0.5, network_error_rate=0.125,
                                   seed=7)
    assert config.faults.tamper_fraction == 0.0 and config.seed == 7


def test_the_configs_the_commands_build_are_frozen(tmp_path):
    from emulation.fleet import FleetConfig
    from models.simulate import SimulationConfig

    with pytest.raises(dataclasses.FrozenInstanceError):
        SimulationConfig().rounds = 3
    assert FleetConfig.__dataclass_params__.frozen
