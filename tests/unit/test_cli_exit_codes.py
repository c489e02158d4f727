"""Every error class reaches the shell as its documented exit code, one line on stderr; --debug re-raises."""

import pytest

from fedtl import cli
from fedtl.errors import (BackboneError, ConfigError, DataError, FederationError, FedTLError, LedgerError,
                          PrivacyBudgetError, UpdateRejected, WeightsUnavailableError)

CASES = [
    (FedTLError, 1), (ConfigError, 2), (DataError, 3), (PrivacyBudgetError, 4), (LedgerError, 4),
    (BackboneError, 5), (WeightsUnavailableError, 5), (FederationError, 6), (UpdateRejected, 6),
]


def _raising(exc: BaseException):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("command,argv", [("cmd_simulate", ["simulate", "--out", "x"]), ("cmd_config", ["config"]),
                                          ("cmd_backbones", ["backbones"]), ("cmd_site_check", ["site", "check", "s.toml"])])
@pytest.mark.parametrize("error,code", CASES, ids=[c.__name__ for c, _ in CASES])
def test_each_error_class_exits_with_its_code_and_one_line(monkeypatch, capsys, command, argv, error, code):
    monkeypatch.setattr(cli, command, _raising(error("Site `st-mary` has spent ε=2.98 of its budget 3.0.")))
    assert cli.main(argv) == code == error.exit_code
    captured = capsys.readouterr()
    assert captured.err == "error: Site `st-mary` has spent ε=2.98 of its budget 3.0.\n" and captured.out == ""


def test_the_documented_codes():
    assert [e.exit_code for e in (ConfigError, DataError, PrivacyBudgetError, BackboneError, FederationError)] == [2, 3, 4, 5, 6]


def test_an_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_simulate", _raising(KeyboardInterrupt()))
    assert cli.main(["simulate", "--out", "x"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


@pytest.mark.parametrize("error", [PrivacyBudgetError, FederationError, ConfigError])
def test_debug_shows_the_traceback(monkeypatch, capsys, error):
    monkeypatch.setattr(cli, "cmd_simulate", _raising(error("boom")))
    with pytest.raises(error, match="boom"):
        cli.main(["--debug", "simulate", "--out", "x"])
    assert "error:" not in capsys.readouterr().err


def test_success_is_zero_and_usage_errors_are_two(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_backbones", lambda args: 0)
    assert cli.main(["backbones"]) == 0
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown command
        cli.main(["simulat"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert cli.main(["simulate"]) == 2  # neither --out nor --resume
    assert "needs --out RUN_DIR" in capsys.readouterr().err
    assert cli.main(["simulate", "--resume", "r", "--sites", "3"]) == 2  # --resume takes the run's own config
    assert "--resume takes the run directory alone" in capsys.readouterr().err

