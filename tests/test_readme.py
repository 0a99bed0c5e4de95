"""Every `jaxcryo ...` command line shown in README.md runs as written, in order, in a fresh folder.

What counts as a command line: a line of a code block (``` or ~~~ fences, at any indentation,
e.g. inside a list item; or a block indented by four spaces) that starts with ``jaxcryo `` (a
leading ``$ `` prompt is dropped). A trailing ``# comment`` is removed, a line ending in ``\\``
continues on the next. Inline code in prose (`jaxcryo COMMAND --help`) is a mention, not a command:
to have a command tested, show it in a code block.

A line that cannot run here (several hosts, a GPU, data the README does not make) is skipped only
by an explicit marker anywhere in README.md, an HTML comment that renders as nothing:

    <!-- readme-test: skip jaxcryo reconstruct particles.star --coordinator -- needs two hosts -->

which skips every command line starting with the text between ``skip`` and ``--`` (the reason
after ``--`` is required). A marker that matches no command line is an error, so none goes stale.

The commands run as ``python -m jaxcryo.cli ARGS`` with this interpreter and environment, each in
the same temporary folder (so later lines see earlier lines' outputs), and must exit 0.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(.+?)\s+--\s+(\S.*?)\s*-->", re.S)


def _strip_comment(line: str) -> str:
    """Drop a trailing '# comment' (a '#' outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every line inside a fenced or an indented code block."""
    out, fence, previous_blank = [], None, True
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            else:
                out.append((number, line.strip()))
            continue
        if line.startswith("    ") and previous_blank and line.strip():  # an indented code block
            out.append((number, line.strip()))
            continue  # the next indented lines belong to the same block
        previous_blank = not line.strip()
    return out


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every `jaxcryo ...` line of the README's code blocks, in order."""
    commands, pending = [], None
    for number, line in code_lines(text):
        if pending is not None:
            start, so_far = pending
            line = so_far + " " + line
            number = start
            pending = None
        if line.startswith("$ "):
            line = line[2:]
        if not line.startswith("jaxcryo "):
            continue
        line = _strip_comment(line)
        if line.endswith("\\"):
            pending = (number, line[:-1].rstrip())
            continue
        commands.append((number, line))
    return commands


def skip_markers(text: str) -> list[tuple[str, str]]:
    """(command prefix, reason) of every readme-test skip marker."""
    return [(" ".join(prefix.split()), reason) for prefix, reason in _SKIP.findall(text)]


def test_parser_finds_blocks_comments_continuations_and_markers():
    text = "\n".join([
        "Prose with `jaxcryo COMMAND --help` inline: a mention.",
        "```",
        "jaxcryo simulate --out sim   # a comment",
        "ls sim",
        "```",
        "- a list item:",
        "  ```bash",
        "  $ jaxcryo fsc a.mrc b.mrc --plot 'x #1.png' \\",
        "      --json f.json",
        "  ```",
        "",
        "    jaxcryo project m.mrc --star s.star --out p.mrcs",
        "",
        "<!-- readme-test: skip jaxcryo reconstruct x.star --coordinator -- needs two hosts -->",
    ])
    assert readme_commands(text) == [(3, "jaxcryo simulate --out sim"),
                                     (8, "jaxcryo fsc a.mrc b.mrc --plot 'x #1.png' --json f.json"),
                                     (12, "jaxcryo project m.mrc --star s.star --out p.mrcs")]
    assert skip_markers(text) == [("jaxcryo reconstruct x.star --coordinator", "needs two hosts")]


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    commands = readme_commands(text)
    markers = skip_markers(text)
    assert commands, "README.md shows no `jaxcryo` command line in a code block"
    unused = [prefix for prefix, _ in markers if not any(c.startswith(prefix) for _, c in commands)]
    assert not unused, f"readme-test skip markers that match no command line: {unused}"

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("MPLBACKEND", "Agg")
    ran, skipped = [], []
    for number, command in commands:
        reason = next((r for prefix, r in markers if command.startswith(prefix)), None)
        if reason is not None:
            skipped.append(f"README.md:{number}: {command} ({reason})")
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jaxcryo.cli", *shlex.split(command)[1:]], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (f"README.md line {number}: `{command}` exited {proc.returncode}:\n"
                                      f"{proc.stderr[-3000:]}")
        ran.append(f"README.md:{number}: {command} ({time.perf_counter() - t0:.1f} s)")
    print("\n".join(["ran:"] + ran + (["skipped by marker:"] + skipped if skipped else [])))
    assert ran or skipped
