"""The README's paper-to-code table names real functions and tests, so the map cannot rot."""
import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def map_names():
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text.split("## Paper to code", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return rows, [name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[2])]


def test_every_row_names_code():
    rows, _ = map_names()
    assert len(rows) >= 10
    assert all("`" in row.split("|")[2] for row in rows)


def test_every_named_function_and_test_exists():
    tests = "".join(open(os.path.join(ROOT, "tests", f)).read() for f in os.listdir(os.path.join(ROOT, "tests"))
                    if f.endswith(".py"))
    checked = 0
    for name in map_names()[1]:
        name = name.split("(")[0]
        test = name.split("::")[-1]
        if test.startswith("test_"):
            assert f"def {test}(" in tests, f"README names a test that does not exist: {name}"
            checked += 1
        elif re.fullmatch(r"\w+\.\w+", name) and os.path.isfile(os.path.join(ROOT, name.split(".")[0] + ".py")):
            module, attr = name.split(".")
            assert hasattr(importlib.import_module(module), attr), f"README names missing code: {name}"
            checked += 1
    assert checked >= 20
