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

List flags are :func:`define_list` (one comma list, items converted and checked: an error names the flag and
the bad item). Commands that keep their flags on absl's global ``FLAGS`` (those with an ``ml_collections``
``--config`` file) start with :func:`run_app` instead of ``absl.app.run``, so their ``--help`` also exits 0.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

from absl import app, flags

Define = Callable[[flags.FlagValues], None]
Body = Callable[[flags.FlagValues, list], Optional[int]]

HELP_ARGS = ("-h", "--help", "--helpshort", "--helpfull")


def help_asked(argv: Sequence[str]) -> Optional[str]:
    """The first help flag of ``argv`` (no program name) before a ``--``, or None."""
    argv = list(argv)
    head = argv[:argv.index("--")] if "--" in argv else argv
    return next((a for a in head if a in HELP_ARGS), None)


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
    if help_asked(argv):
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


def run_app(main: Callable[[list], Any]) -> None:
    """``absl.app.run(main)`` for a command whose flags are on absl's global ``FLAGS``, except that ``--help``
    (``-h``, ``--helpshort``) prints the module's doc and its flags on stdout and exits 0 (absl exits 1);
    ``--helpfull`` adds the flags of every module imported."""
    asked = help_asked(sys.argv[1:])
    if asked:
        app.usage(shorthelp=asked != "--helpfull", writeto_stdout=True, exitcode=0)
    app.run(main)


class ListParser(flags.ListParser):
    """A comma list whose items are converted by ``item`` and, when ``choices`` is given, must be among them."""

    def __init__(self, item: Callable[[str], Any] = str, choices: Sequence[Any] = ()):
        super().__init__()
        self.item, self.choices = item, tuple(choices)

    def parse(self, argument: Any) -> list:
        out = []
        for x in super().parse(argument):
            try:
                value = self.item(x)
            except (TypeError, ValueError):
                raise ValueError(f"item {x!r} is not a valid {getattr(self.item, '__name__', self.item)}") from None
            if self.choices and value not in self.choices:
                raise ValueError(f"unknown item {x!r}; choose from {', '.join(map(str, self.choices))}")
            out.append(value)
        return out

    def flag_type(self) -> str:
        return f"comma separated list of {getattr(self.item, '__name__', 'str')}"


def define_list(name: str, default: Optional[Sequence[Any]], help: str, flag_values: flags.FlagValues,
                item: Callable[[str], Any] = str, choices: Sequence[Any] = ()) -> None:
    """A list flag given as one comma list (``--seeds=1,2,3``), its items converted by ``item`` (``int``,
    ``float``, ...) and checked against ``choices``; a bad item is a usage error naming the flag and the item."""
    flags.DEFINE(ListParser(item, choices), name, default, help, flag_values, flags.CsvListSerializer(","))
