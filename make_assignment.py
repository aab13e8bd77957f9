"""Write a student copy of this repository: every body between `# BEGIN SOLUTION` and
`# END SOLUTION` becomes `raise NotImplementedError("exercise: <function>")`; docstrings, hints and
every other file stay byte for byte. EXERCISES.md says what to implement and which pytest command
grades it.

    python make_assignment.py --out ../noiserefine-student
    python make_assignment.py --out ../hw3 --only msd_loss full_loss

Only the files git tracks (or would: untracked, not ignored) are copied; outside a git checkout,
everything but .git, .venv, runs, data, samples and caches. It refuses to write inside this
repository or into a folder that is not empty.
"""
import os
import re
import shutil
import subprocess

import cli
from cli import die

ROOT = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
SKIP = {".git", ".venv", "runs", "data", "samples", "__pycache__", ".pytest_cache"}


def repository_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        return sorted(f for f in out.decode().split("\0")
                      if f and os.path.isfile(os.path.join(ROOT, f)))
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = sorted(d for d in dirs if d not in SKIP)
            files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in sorted(names)]
        return files


def indentation(line):
    return len(line) - len(line.lstrip())


def enclosing_name(lines, i):
    """'Class.method' or 'function': the def that line i sits in, and the class around that def."""
    indent, name = indentation(lines[i]), None
    for line in reversed(lines[:i]):
        if not line.strip() or indentation(line) >= indent:
            continue
        indent = indentation(line)  # one block further out
        m = re.match(r"\s*(def|class)\s+(\w+)", line)
        if m and m.group(1) == "def" and name is None:
            name = m.group(2)
        elif m and m.group(1) == "class" and name is not None:
            return f"{m.group(2)}.{name}"
        if indent == 0:
            break
    return name


def solutions(text):
    """[(qualified name, first line, last line)] of every marked block, 0-based and inclusive."""
    lines, blocks, start = text.splitlines(keepends=True), [], None
    for i, line in enumerate(lines):
        if line.strip() == BEGIN:
            start = i
        elif line.strip() == END and start is not None:
            blocks.append((enclosing_name(lines, start), start, i))
            start = None
    return blocks


def blank(text, only=None):
    """The student version of one file's text, and the names of the blocks it blanked."""
    lines, done = text.splitlines(keepends=True), []
    for name, first, last in reversed(solutions(text)):
        if only is not None and name not in only and name.split(".")[-1] not in only:
            continue
        indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
        lines[first:last + 1] = [f'{indent}raise NotImplementedError("exercise: {name}")\n']
        done.append(name)
    return "".join(lines), done[::-1]


def all_exercises(files):
    return [name for f in files if f.endswith(".py") for name, _, _ in solutions(read(f))]


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def build_parser():
    p = cli.Parser(__doc__)
    p.add_argument("--out", type=cli.path, required=True,
                   help="an empty or new folder outside this repository")
    p.add_argument("--only", type=cli.name, nargs="+", default=None,
                   help="blank only these functions (default: all marked)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = os.path.realpath(args.out)
    if out == ROOT or out.startswith(ROOT + os.sep):
        die(f"--out {args.out} is inside the repository; choose a folder outside it")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        die(f"--out {args.out} exists and is not an empty folder")
    files = repository_files()
    names = all_exercises(files)
    if args.only:
        unknown = [n for n in args.only
                   if n not in names and n not in {m.split(".")[-1] for m in names}]
        if unknown:
            die(f"--only {' '.join(unknown)}: no such marked function; marked are "
                f"{', '.join(names)}")
    blanked = []
    for rel in files:
        dest = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        text = read(rel) if rel.endswith(".py") else None
        if text is not None and solutions(text):
            student, done = blank(text, args.only)
            with open(dest, "w", encoding="utf-8") as f:
                f.write(student)
            blanked += [f"{rel}: {n}" for n in done]
        else:
            shutil.copy2(os.path.join(ROOT, rel), dest)
    print(f"wrote a student copy of {len(files)} files to {out}; {len(blanked)} functions blanked "
          "(EXERCISES.md, exercises 1-6):")
    for line in blanked:
        print(f"  {line}")


if __name__ == "__main__":
    main()
