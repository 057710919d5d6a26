"""Every option of every subcommand says what it does and, where it has one, its default
(the project's bar: complete ``--help``). Walks the real parser, so a new option without help
fails here rather than in a user's terminal."""

from __future__ import annotations

import argparse

from linewatch.cli.main import build_parser


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def _gaps() -> list[str]:
    gaps = []
    for path, action in _options(build_parser(), ("linewatch",)):
        name = "/".join(action.option_strings) or action.dest
        where = f"{' '.join(path)} {name}"
        text = action.help or ""
        if not text.strip() or text == argparse.SUPPRESS:
            gaps.append(f"{where}: no help")
            continue
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                   argparse._CountAction, argparse._AppendAction))
        has_default = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        if has_default and not flag and "default" not in text.lower():
            gaps.append(f"{where}: its default {action.default!r} is not stated")
    return gaps


def test_every_option_has_help_that_states_its_default():
    gaps = _gaps()
    assert not gaps, "options whose --help is incomplete:\n" + "\n".join(gaps)


def test_the_walk_sees_the_subcommands():
    paths = {" ".join(p) for p, _ in _options(build_parser(), ("linewatch",))}
    assert {"linewatch produce", "linewatch sink", "linewatch calibrate run", "linewatch bench worker"} <= paths
