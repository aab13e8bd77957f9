"""The README's paper-to-code table names real functions and tests, and every relative link of the
README, EXERCISES.md and docs/ resolves to a file and heading, so the map cannot rot."""
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
    tests = "".join(open(os.path.join(ROOT, "tests", f)).read()
                    for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py"))
    checked = 0
    for name in map_names()[1]:
        name = name.split("(")[0]
        test = name.split("::")[-1]
        if test.startswith("test_"):
            assert f"def {test}(" in tests, f"README names a test that does not exist: {name}"
            checked += 1
        elif (re.fullmatch(r"\w+\.\w+", name)
              and os.path.isfile(os.path.join(ROOT, name.split(".")[0] + ".py"))):
            module, attr = name.split(".")
            assert hasattr(importlib.import_module(module), attr), \
                f"README names missing code: {name}"
            checked += 1
    assert checked >= 20


def anchor(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = ["README.md", "EXERCISES.md"] + [os.path.join("docs", f)
                                             for f in os.listdir(os.path.join(ROOT, "docs"))
                                             if f.endswith(".md")]
    checked = 0
    for page in pages:
        text = open(os.path.join(ROOT, page)).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, fragment = target.partition("#")
            file = (os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path
                    else os.path.join(ROOT, page))
            assert os.path.isfile(file), f"{page} links to a missing file: {target}"
            if fragment:
                headings = re.findall(r"^#+ (.+)$", open(file).read(), flags=re.M)
                assert fragment in {anchor(h) for h in headings}, \
                    f"{page} links to a missing heading: {target}"
            checked += 1
    assert checked >= 15
