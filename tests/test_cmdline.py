"""The conventions every command and tool shares (``medcap._cmdline``): the older
``--snake_case`` spellings are rewritten, help shows ``--kebab-case`` only; a refusal from
anywhere below a command is one line with exit 2, a Ctrl-C one line with exit 130 (end to
end in ``test_ctrl_c``). (A quiet closed pipe is checked end to end in ``test_cli`` and
``tools/test_entry_points``.)"""

from __future__ import annotations

import pytest

from medcap import _cmdline as cmdline


def test_old_snake_case_flags_are_rewritten_and_help_shows_kebab_case(capsys):
    import argparse

    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--input-dir", required=True)
    p.add_argument("--pad-ratio", type=float, default=1.8)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("rest", nargs="*")
    cmdline.accept_snake_case(p)
    ns = p.parse_args(["--input_dir", "a", "--pad_ratio=2.5", "--no_progress", "--", "--pad_ratio"])
    assert (ns.input_dir, ns.pad_ratio, ns.no_progress, ns.rest) == ("a", 2.5, True, ["--pad_ratio"])
    assert p.parse_args(["--inp", "b"]).input_dir == "b"  # abbreviations stay unambiguous
    p.print_help()
    out = capsys.readouterr().out
    assert "--input-dir" in out and "--input_dir" not in out


def test_a_refusal_from_below_a_command_is_one_line_exit_2_and_ctrl_c_is_130(monkeypatch, capsys):
    from medcap import cli
    from medcap.config import ConfigError
    from medcap.eval._results import ResultsRefused

    def refuses(error):
        def command(argv):
            raise error
        return command

    cases = [(ResultsRefused("out/x.csv was made by another model"), 2,
              "medcap fake: error: out/x.csv was made by another model"),
             (ConfigError("no such key 'lr'"), 2, "medcap fake: error: no such key 'lr'"),
             (KeyboardInterrupt(), 130, "medcap fake: stopped (Ctrl-C)")]
    for error, status, line in cases:
        monkeypatch.setitem(cli._COMMANDS, "fake", refuses(error))
        assert cli.main(["fake"]) == status
        assert capsys.readouterr().err.splitlines() == [line]
    # anything else is medcap's own failure: not dressed up as the user's mistake
    monkeypatch.setitem(cli._COMMANDS, "fake", refuses(RuntimeError("a bug")))
    with pytest.raises(RuntimeError):
        cli.main(["fake"])
