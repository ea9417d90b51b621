"""Every command a message tells a person to run exists, with the options it names, and messages read as English.

Theory: hints rot. A message says "Add one with `fleet classes add`" and nobody notices that the command was never
written. This test reads every string literal of the source (ast, so f-strings count, with each `{...}` taken as a
value), takes each backticked command of the three CLIs (`fleet ...`, `edgefleet-cloud ...`, `edgefleet-agent
...`) and each example line of their --help (`_examples("fleet status", ...)`), and resolves it against the real
command trees: the typer apps of `fleet` and `edgefleet-cloud` (as click sees them) and the argparse parser of
`edgefleet-agent`. Each word must be a subcommand until a command is reached (a group named alone is fine: a pointer
to its --help); after that, every `--option` must be one of that command's or its groups'. A pipe, `&&`, `;`, `)`
or `...` ends a command; `[...]` brackets are read as their contents; `a|b` must have both.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("cloud", "edge_agent", "fleet", "common", "protos", "examples", "bench")
PROGS = ("fleet", "edgefleet-cloud", "edgefleet-agent")
_BACKTICKED = re.compile(r"`((?:" + "|".join(map(re.escape, PROGS)) + r")(?: [^`]*)?)`")
_PLACEHOLDER = "X"  # what an f-string's {value} reads as


def _literals(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of every string literal; an f-string's values become `_PLACEHOLDER`."""
    inside_fstring: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else _PLACEHOLDER
                           for v in node.values)
            inside_fstring.update(id(v) for v in node.values)
            yield node.lineno, text
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstring:
            yield node.lineno, node.value


def _example_lines(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """The command lines given to `_examples(...)` (the CLIs' --help epilogs)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "_examples":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith(PROGS):
                    yield arg.lineno, arg.value


def commands_in(text: str) -> list[str]:
    """The backticked commands a string names."""
    return _BACKTICKED.findall(text)


def named_commands() -> list[tuple[str, str]]:
    """("path:line", command) for every command named in a string literal of the source, and every example."""
    out = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            where = path.relative_to(ROOT)
            out += [(f"{where}:{line}", c) for line, text in _literals(tree) for c in commands_in(text)]
            out += [(f"{where}:{line}", text) for line, text in _example_lines(tree)]
    return out


def _words(command: str) -> list[str]:
    words = []
    for word in command.replace("[", " ").replace("]", " ").split():
        if word in ("|", "&&", ";", "||", "...", "…") or word.startswith(")"):
            break
        words.append(word.rstrip(")"))
    return words


def _click_problem(root: Any, words: list[str]) -> str | None:
    """Why `words` (after the program name) is not a command of `root`, or None when it is."""
    cmd, ctx_options = root, set(_options(root))
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-"):
            if _option_name(word) not in ctx_options:
                return f"{_option_name(word)} is not an option of `{cmd.name}`"
        elif _is_group(cmd):
            # `show|refit`: either; each must exist (the walk goes on with the first).
            subs = [cmd.commands.get(alt) for alt in word.split("|")]
            if None in subs:
                return f"`{cmd.name}` has no command {word!r} (it has: {', '.join(sorted(cmd.commands))})"
            cmd = subs[0]
            ctx_options |= set(_options(cmd))
        i += 1
    return None  # a group named alone is a pointer to it: its --help lists the commands


def _is_group(cmd: Any) -> bool:
    # Duck-typed: typer ships its own copy of click, whose classes are not `click.Group`.
    return isinstance(getattr(cmd, "commands", None), dict)


def _options(cmd: Any) -> list[str]:
    names = ["--help", "-h"]
    for param in cmd.params:
        if param.param_type_name == "option":
            names += param.opts + param.secondary_opts
    return names


def _option_name(word: str) -> str:
    return word.split("=", 1)[0]


def _argparse_problem(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    current = parser
    for word in words:
        if word.startswith("-"):
            if _option_name(word) not in current._option_string_actions:
                return f"{_option_name(word)} is not an option of `{current.prog}`"
            continue
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            choices = subs[0].choices
            if word not in choices:
                return f"`{current.prog}` has no command {word!r} (it has: {', '.join(sorted(choices))})"
            current = choices[word]
    return None


def problem(command: str) -> str | None:
    """Why `command` does not exist in its CLI, or None when it does."""
    prog, *words = _words(command)
    if prog == "fleet":
        from edgefleet.fleet.main import app

        return _click_problem(typer.main.get_command(app), words)
    if prog == "edgefleet-cloud":
        from edgefleet.cloud.main import app as cloud_app

        return _click_problem(typer.main.get_command(cloud_app), words)
    from edgefleet.edge_agent.main import _parser

    return _argparse_problem(_parser(), words)


def test_every_command_a_message_names_exists():
    named = named_commands()
    assert len(named) > 40, "the scan found almost no commands: is it reading the source?"
    wrong = [f"{where}: `{command}`: {why}" for where, command in named if (why := problem(command))]
    assert not wrong, "messages name commands that do not exist:\n" + "\n".join(wrong)


@pytest.mark.parametrize("command,expected", [
    ("fleet classes add", "has no command 'add'"),
    ("fleet models push --nme x", "--nme is not an option"),
    ("fleet classes show|add", "has no command 'show|add'"),
    ("edgefleet-cloud keys nope", "has no command 'nope'"),
    ("edgefleet-agent run --configg FILE", "--configg is not an option"),
    ("edgefleet-agent enroll", "has no command 'enroll'"),
])
def test_a_hint_naming_a_missing_command_or_option_is_caught(command, expected):
    why = problem(command)
    assert why is not None and expected in why, why


@pytest.mark.parametrize("command", [
    "fleet devices", "fleet login --url URL --token TOKEN", "fleet jobs show X", "fleet status --json | jq .",
    "fleet models provenance X --version X --class CLASS", "edgefleet-cloud serve", "edgefleet-cloud keys",
    "fleet classes show|refit", "fleet jobs ...", "fleet models provenance NAME [--version N]",
    "edgefleet-agent check-config --config FILE", "edgefleet-agent run -c FILE",
])
def test_commands_that_exist_resolve(command):
    assert problem(command) is None


def test_the_scan_reads_f_strings_and_examples():
    tree = ast.parse('x = f"run `fleet jobs show {job.id}` now"\ny = _examples("fleet status --json")\n'
                     'z = "fleet status: 3 rows"\n')
    found = [c for _, text in _literals(tree) for c in commands_in(text)] + [t for _, t in _example_lines(tree)]
    assert found == ["fleet jobs show X", "fleet status --json"]


# -- grammar: "a" before a vowel sound, "an" before a consonant, and phrases like "has no any" -------------------

# Words whose first letter misleads: "a user", "a unique", "a one-line"; "an hour", "an x86", "an MQTT", "an npz".
_A_OK = re.compile(r"^(u(?:s|n(?:i|ary)|dev)|one|once|eu|ur[il])", re.I)
_AN_OK = re.compile(r"^(h(?:our|onest)|x86|mqtt|rsa|sdk|svg|http|lru|mse|npz|fp\d|mib|mb|s3|ml|led|hmac|x|f|l|m|n|"
                    r"r|s|\d)", re.I)
_A_VOWEL = re.compile(r"\b[Aa] ([aeiouAEIOU][\w-]*)")
_AN_CONSONANT = re.compile(r"\b[Aa]n ([b-df-hj-np-tv-zB-DF-HJ-NP-TV-Z][\w-]*)")
_WRONG_PHRASES = ("no any", "a enroll", "a admin", "an device")


def grammar_slips(text: str) -> list[str]:
    slips = [f"a {w}" for w in _A_VOWEL.findall(text) if not _A_OK.match(w)]
    slips += [f"an {w}" for w in _AN_CONSONANT.findall(text) if not _AN_OK.match(w)]
    return slips + [p for p in _WRONG_PHRASES if p in text]


def test_messages_use_a_and_an_right():
    slips = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in _literals(ast.parse(path.read_text(encoding="utf-8"))):
                slips += [f"{path.relative_to(ROOT)}:{line}: {s!r}" for s in grammar_slips(text)]
    assert not slips, "\n".join(slips)


def test_the_grammar_check_catches_the_slips_it_was_written_for():
    assert grammar_slips("model 'x' has no any version") == ["no any"]
    assert grammar_slips("a enroll token may not use it") == ["a enroll", "a enroll"]
    assert grammar_slips("an device token, a user, an hour, an x86 box, a one-line error") == ["an device",
                                                                                            "an device"]
