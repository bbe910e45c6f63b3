"""The conventions every command and tool shares (``medcap._cmdline``): the older
``--snake_case`` spellings are rewritten, help shows ``--kebab-case`` only. (A quiet closed
pipe is checked end to end in ``test_cli`` and ``tools/test_entry_points``.)"""

from __future__ import annotations

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
