"""make_assignment.py and EXERCISES.md: each exercise's grading command fails on a fresh student
copy and passes on this repository, every marked body really is gone, and nothing else changes."""
import ast
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import make_assignment  # noqa: E402

COMMANDS = re.findall(r"^    (python -m pytest .+)$",
                      open(os.path.join(ROOT, "EXERCISES.md")).read(), re.M)


def make(out, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "make_assignment.py"), "--out",
                           str(out), *extra], capture_output=True, text=True, timeout=120)


def grade(command, cwd):
    argv = shlex.split(command)
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("course") / "student"
    result = make(out)
    assert result.returncode == 0, result.stderr
    return out


def functions(tree):
    """{'Class.method' or 'function': node} of a module."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body
                          if isinstance(f, ast.FunctionDef)})
    return found


def test_every_marked_body_raises_and_every_other_file_is_byte_identical(student):
    files, marked = make_assignment.repository_files(), 0
    for rel in files:
        original = open(os.path.join(ROOT, rel), "rb").read()
        copy = open(os.path.join(student, rel), "rb").read()
        names = ([name for name, _, _ in make_assignment.solutions(original.decode())]
                 if rel.endswith(".py") else [])
        if not names:
            assert copy == original, rel
            continue
        assert not make_assignment.solutions(copy.decode())
        defs = functions(ast.parse(copy.decode()))
        for name in names:
            body = defs[name].body
            # docstring
            assert (isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)), name
            assert len(body) == 2 and isinstance(body[1], ast.Raise), name
            assert (body[1].exc.func.id == "NotImplementedError"
                    and name in body[1].exc.args[0].value)
            marked += 1
    # ddim_coeffs, guided_eps, LoRA (2), Refiner.forward, msd_loss, full_loss, a sampler
    assert marked >= 7


def test_the_student_copy_holds_every_file_the_exercises_link_to(student):
    """EXERCISES.md sends the student to docs/paper.md for each exercise: the copy must have it,
    with each section heading an exercise names."""
    text = open(os.path.join(student, "EXERCISES.md")).read()
    links = {link for link in re.findall(r"\]\(([^)#]+)", text) if "://" not in link}
    links |= set(re.findall(r"Read: (\S+\.md)", text))
    assert "docs/paper.md" in links
    for rel in links:
        assert os.path.isfile(os.path.join(student, rel)), rel
    notes = open(os.path.join(student, "docs", "paper.md")).read()
    for section in re.findall(r'Read: docs/paper\.md §2, "([^"]+)"', text):
        assert section in notes, section


def test_each_grading_command_fails_on_the_student_copy_and_passes_here(student):
    assert len(COMMANDS) >= 6
    for command in COMMANDS:
        here = grade(command, ROOT)
        assert (here.returncode == 0 and " passed" in here.stdout
                and "failed" not in here.stdout), (command, here.stdout)
        there = grade(command, student)
        assert there.returncode != 0 and "NotImplementedError" in there.stdout, \
            (command, there.stdout[-2000:])


def graded():
    """[(number, functions, command, promised count)] of EXERCISES.md's graded exercises, in its
    order; a function is named as make_assignment.py --only takes it
    ('noiserefine.LoRA.forward' -> 'LoRA.forward')."""
    text, found = open(os.path.join(ROOT, "EXERCISES.md")).read(), []
    for number, names, body in re.findall(r"^## (\d+)\. [^\n]*?: (`[^\n]+`)\n(.*?)(?=^## |\Z)",
                                          text, re.M | re.S):
        command = re.search(r"^    (python -m pytest .+)$", body, re.M)
        promised = re.search(r"Passing: `(\d+) passed`", body)
        names = [n.split(".", 1)[1]
                 if os.path.isfile(os.path.join(ROOT, n.split(".")[0] + ".py")) else n
                 for n in re.findall(r"`([\w.]+)`", names)]
        found.append((int(number), names, command.group(1), int(promised.group(1))))
    return found


def test_the_exercises_solved_in_order_each_pass_with_the_count_they_promise(tmp_path):
    exercises = graded()
    assert [n for n, *_ in exercises] == list(range(1, len(exercises) + 1))
    every = sorted(n for _, names, _, _ in exercises for n in names)
    assert every == sorted(make_assignment.all_exercises(make_assignment.repository_files()))
    for k, (number, _, command, promised) in enumerate(exercises):
        later = [n for _, names, _, _ in exercises[k + 1:] for n in names]  # still blank
        copy = tmp_path / f"solved-1-to-{number}"
        if later:
            assert make(copy, "--only", *later).returncode == 0
        result = grade(command, copy if later else ROOT)
        assert result.returncode == 0 and re.search(rf"(^|\s){promised} passed", result.stdout), \
            (number, result.stdout[-1500:])
        assert "failed" not in result.stdout and "error" not in result.stdout.lower(), \
            (number, result.stdout[-1500:])


def test_only_blanks_the_named_functions(tmp_path):
    assert make(tmp_path / "one", "--only", "msd_loss").returncode == 0
    assert "raise NotImplementedError" not in open(tmp_path / "one" / "diffusion.py").read()
    msd = next(c for c in COMMANDS if "msd_gradient" in c)
    ddim = next(c for c in COMMANDS if "coefficients" in c)
    assert (grade(msd, tmp_path / "one").returncode != 0
            and grade(ddim, tmp_path / "one").returncode == 0)


def test_refuses_the_repository_and_a_non_empty_folder(tmp_path):
    inside = make(os.path.join(ROOT, "student_copy"))
    assert inside.returncode == 2 and "inside the repository" in inside.stderr
    assert not os.path.exists(os.path.join(ROOT, "student_copy"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "homework.txt").write_text("mine")
    busy = make(tmp_path / "full")
    assert busy.returncode == 2 and "not an empty folder" in busy.stderr
    assert make(tmp_path / "x", "--only", "no_such_function").returncode == 2
