"""The README tells the truth about the command line: every command it shows parses, every flag it names exists.

The parser is the real one (``streaming_llm.cli.build_parser``, no torch imported); nothing is run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import textwrap
import tomllib

import pytest
from conftest import REPO

from streaming_llm.cli import build_parser

README = (REPO / "README.md").read_text()
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Paragraphs that name flags for several commands at once: each flag must be in every one of them.
ALL_OF = {"**Sampling defaults**": ("generate", "demo", "chat", "ingest")}
# Sections about one command: every flag named there belongs to it.
SECTION = {"OpenAI-compatible server": ("serve",)}


def subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)command parser that ``words`` (``["eval", "ppl", ...]``) reach, and the words it names."""
    path = []
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
        path.append(word)
    return parser, path


def help_text(words: list[str]) -> str:
    return subparser(build_parser(), words)[0].format_help()


COMMANDS = {
    " ".join(path): help_text(path)
    for path in (["generate"], ["demo"], ["chat"], ["ingest"], ["serve"], ["bench"], ["eval", "ppl"], ["eval", "sweep"],
                 ["eval", "recall"], ["eval", "stability"], ["eval", "demo"], [])
}  # fmt: skip


def has_flag(help: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help) is not None


def fenced(language: str) -> list[str]:
    """The README's fenced blocks of ``language``, also those indented inside a list item (dedented)."""
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```", README, re.S | re.M)
    return [textwrap.dedent(body) for _, body in blocks]


def shell_commands() -> list[list[str]]:
    """Every command of the README's fenced bash blocks, split as the shell would (comments dropped)."""
    commands = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", "||", ";", "|"):
                    if command:
                        commands.append(command)
                    command = []
                elif command or not re.fullmatch(r"[A-Z_]+=\S*", word):  # NAME=value before a command: its env
                    command.append(word)
    return commands


def test_the_readme_has_commands_to_check():
    invoked = [c for c in shell_commands() if c[0] == "streaming-llm"]
    assert len(invoked) >= 10 and any(c[1] == "serve" for c in invoked) and any(c[0] == "pip" for c in shell_commands())
    assert ["streaming-llm", "demo"] in invoked  # also behind an environment assignment


@pytest.mark.parametrize("command", [c for c in shell_commands() if c[0] == "streaming-llm"], ids=" ".join)
def test_every_streaming_llm_command_in_the_readme_parses(command):
    parser = build_parser()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parser.parse_args(command[1:])
        except SystemExit as exit:
            assert exit.code == 0, f"{shlex.join(command)}: {err.getvalue()}"  # --help / --version
    _, path = subparser(build_parser(), command[1:])
    for flag in FLAG.findall(" ".join(command)):
        assert has_flag(COMMANDS[" ".join(path)], flag), f"{flag} is not in `streaming-llm {' '.join(path)} --help`"


def test_other_shell_commands_split_and_pip_extras_exist():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for command in shell_commands():  # shlex has split them all
        for word in command:
            if found := re.fullmatch(r"\.\[([\w,-]+)\]", word):
                assert set(found[1].split(",")) <= set(extras), command


def test_python_blocks_compile():
    for block in fenced("python"):
        compile(block, "README.md", "exec")


def paragraphs() -> list[tuple[str, str]]:
    """``(section, paragraph)`` of the README's prose (fenced blocks left out)."""
    prose = re.sub(r"^( *)```.*?^\1```", "", README, flags=re.S | re.M)
    section, found = "", []
    for paragraph in re.split(r"\n\s*\n|\n(?=\* )", prose):
        if heading := re.match(r"#+ (.*)", paragraph.strip()):
            section = heading[1].strip()
        found.append((section, paragraph))
    return found


def test_every_flag_the_prose_names_is_in_its_commands_help():
    problems = []
    for section, paragraph in paragraphs():
        spans = re.findall(r"`([^`]+)`", paragraph)
        named = [w for w in re.findall(r"`([a-z]+)`", paragraph) if w in COMMANDS]
        for span in spans:
            words = span.split()
            if words and words[0] == "streaming-llm":  # a whole command in the prose
                _, path = subparser(build_parser(), words[1:])
                owners = [" ".join(path)]
            elif words and words[0] in ("python", "pip", "torchrun", "curl", "hf"):
                continue
            else:
                owners = next((c for p, c in ALL_OF.items() if paragraph.lstrip().startswith(p)), None)
                owners = owners or SECTION.get(section) or named or None
            for flag in FLAG.findall(span):
                if owners is None:  # a flag the paragraph ties to no command: some command has it
                    ok = any(has_flag(h, flag) for h in COMMANDS.values())
                elif paragraph.lstrip().startswith(tuple(ALL_OF)) or section in SECTION or words[0] == "streaming-llm":
                    ok = all(has_flag(COMMANDS[o], flag) for o in owners)
                else:
                    ok = any(has_flag(COMMANDS[o], flag) for o in owners)
                if not ok:
                    problems.append(f"{section}: `{span}`: {flag} not in {owners or 'any command'}")
    assert not problems, "\n".join(problems)
