"""Every flag of every entry point, fuzzed from the parsers themselves (so a new flag is fuzzed
without anyone writing a case): each hostile value a flag's type refuses must end in exactly one
line, `error: ` naming the flag, exit status 2, no traceback, and nothing written. Values a flag's
type accepts (a seed of 0, a path that does not exist yet as --out) would start real work, so they
are not run here; the validators' domains are what decides, and
`test_every_flag_that_takes_a_value_is_validated` makes sure that every flag has one.
"""
import argparse
import importlib
import os

import pytest

ENTRY_POINTS = {  # script: the arguments a run needs besides the fuzzed flag
    "train_teacher": [], "train_refiner": [], "sample": [], "evaluate": [], "analyze": ["diff"],
    "ablate": [], "bench": [], "make_assignment": ["--out", "student"], "study": [],
}
HOSTILE = ["0", "-1", "-0.5", "nan", "inf", "-inf", "1e30", "99999999999999999999", "", " ", "abc",
           "{missing}", "{folder}", "{empty}", "{text}", "{under_a_file}"]


def valued_flags(script):
    parser = importlib.import_module(script).build_parser()
    return [a for a in parser._actions
            if a.option_strings and a.nargs != 0 and a.help != argparse.SUPPRESS]


def refuses(action, value):
    """Whether the flag's own type or choices turn the value down (argparse's order: type, then
    choices)."""
    try:
        converted = action.type(value) if action.type else value
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return True
    return action.choices is not None and converted not in action.choices


@pytest.fixture
def hostile(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not what you think\n")
    return {"missing": str(tmp_path / "missing.pt"), "folder": str(tmp_path / "folder"),
            "empty": str(tmp_path / "empty.pt"), "text": str(tmp_path / "notes.txt"),
            "under_a_file": str(tmp_path / "notes.txt" / "sub")}


def tree(root):
    return sorted(os.path.join(d, f) for d, dirs, files in os.walk(root) for f in dirs + files)


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_flag_that_takes_a_value_is_validated(script):
    loose = [a.option_strings[-1] for a in valued_flags(script)
             if a.choices is None and not hasattr(a.type, "domain")]
    assert not loose, f"{script}: flags without a validator from cli.py: {loose}"


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_refused_value_of_every_flag_is_one_line_naming_it(
        script, hostile, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(script).main
    before, cases, failures = tree(tmp_path), 0, []
    for action in valued_flags(script):
        flag = action.option_strings[-1]
        for value in (v.format(**hostile) for v in HOSTILE):
            if not refuses(action, value):
                continue
            values = [value] if action.nargs in (None, "+") else [value] * action.nargs
            cases += 1
            with pytest.raises(SystemExit) as e:
                main([*ENTRY_POINTS[script], flag, *values])
            err = capsys.readouterr().err.strip().splitlines()
            if (e.value.code != 2 or len(err) != 1 or not err[0].startswith("error: ")
                    or flag not in err[0]):
                failures.append((flag, value, e.value.code, err))
    assert not failures, failures
    assert tree(tmp_path) == before  # nothing written, not even an empty --out folder
    assert cases >= 10, cases  # every entry point has at least this many refusals to check
    print(f"{script}: {cases} refused values, each one line")
