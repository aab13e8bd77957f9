"""docs/troubleshooting.md lists every one-line error the code can print: for each message written
in the code (safety.BadInput, cli.die, a flag type's ArgumentTypeError), the longest piece of its
text between placeholders must appear on the page. A new message without a row fails here."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = re.compile(r'(?:BadInput|die|ArgumentTypeError)\(f?"((?:[^"\\]|\\.)*)"')


def messages():
    """(file, the longest literal piece of each message's first string), pieces of 10 or more
    characters."""
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        for m in MESSAGE.finditer(open(path).read()):
            pieces = [p.strip(" ;:,()") for p in re.split(r"\{[^}]*\}", m.group(1))]
            piece = max(pieces, key=len)
            if len(piece) >= 10:
                yield os.path.basename(path), piece


def test_every_message_in_the_code_is_on_the_troubleshooting_page():
    page = open(os.path.join(ROOT, "docs", "troubleshooting.md")).read()
    found = list(messages())
    # the scan sees the messages (it would pass vacuously if the pattern broke)
    assert len(found) >= 40
    missing = [f"{path}: {piece!r}" for path, piece in found if piece not in page]
    assert not missing, "add a row to docs/troubleshooting.md for: " + "; ".join(missing)
