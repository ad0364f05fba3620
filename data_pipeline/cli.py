"""One command-line style for every command of the project: absl flags (``--flag value`` or ``--flag=value``;
booleans ``--flag`` / ``--noflag``; list flags comma separated), positional arguments where a command takes
them, ``--help`` listing every flag with its help text.

A command module defines its flags in one function ``define(flag_values)`` and its work in
``body(flag_values, positional) -> exit code``, then::

    main = cli.command("python -m package.module", __doc__, define, body)   # main(argv) for Python callers
    if __name__ == "__main__":
        cli.run(main)                                                         # the absl app

``main(argv)`` parses ``argv`` (without the program name) against a fresh set of flags, so a test or a
notebook may call it many times in one process; ``cli.run`` runs it as an absl app (absl's logging set-up,
exit code returned by ``body``). Errors in the command line exit with code 2 and say what is wrong.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from absl import app, flags

Define = Callable[[flags.FlagValues], None]
Body = Callable[[flags.FlagValues, list], Optional[int]]

HELP_ARGS = ("-h", "--help", "--helpshort", "--helpfull")


def usage_error(prog: str, message: str) -> SystemExit:
    """Print ``prog: error: message`` to stderr; the ``SystemExit(2)`` to raise."""
    print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
    return SystemExit(2)


def help_text(prog: str, doc: str, fv: flags.FlagValues) -> str:
    """The command's usage line, its description and every flag with its help."""
    return f"usage: {prog} [flags]\n\n{(doc or '').strip()}\n\nflags:\n{fv.get_help(include_special_flags=False)}\n"


def parse(prog: str, doc: str, define: Define, argv: Sequence[str]) -> tuple[flags.FlagValues, list]:
    """Flags defined by ``define`` parsed from ``argv`` (no program name); returns them and the positional
    arguments. ``--help`` prints :func:`help_text` and exits 0; a bad command line exits 2."""
    fv = flags.FlagValues()
    define(fv)
    argv = list(argv)
    head = argv[:argv.index("--")] if "--" in argv else argv
    if any(a in HELP_ARGS for a in head):
        print(help_text(prog, doc, fv))
        raise SystemExit(0)
    try:
        rest = fv([prog, *argv])
    except flags.Error as e:
        raise usage_error(prog, str(e)) from None
    return fv, rest[1:]


def command(prog: str, doc: str, define: Define, body: Body) -> Callable[[Optional[Sequence[str]]], int]:
    """``main(argv=None) -> exit code``: :func:`parse` ``argv`` (default ``sys.argv[1:]``), then ``body``."""
    def main(argv: Optional[Sequence[str]] = None) -> int:
        fv, positional = parse(prog, doc, define, sys.argv[1:] if argv is None else argv)
        return body(fv, positional) or 0

    main.__doc__ = f"``{prog}``: {(doc or '').strip().splitlines()[0] if doc else ''}"
    return main


def _own_parser(argv: list) -> list:
    """absl's own flags are parsed (absl needs them) with the log level left at WARNING, Python's default,
    as the commands had before; the command parses ``argv`` itself."""
    flags.FLAGS([*argv[:1], "--verbosity=-1"])
    return list(argv)


def run(main: Callable[[Optional[Sequence[str]]], int]) -> None:
    """Run ``main`` as an absl app (absl's start-up, then ``main`` on the command line; its code is the exit
    status)."""
    app.run(lambda argv: main(argv[1:]), flags_parser=_own_parser)
