"""One command-line style (absl flags through data_pipeline.cli) for every command: --help lists every flag,
a bad command line exits 2 naming the problem, ``--flag value`` and ``--flag=value`` mean the same."""
import importlib

import pytest
from absl import flags

from data_pipeline import cli

COMMANDS = ["data_pipeline.tokenizer", "iopo_jax.tools.make_tiny_model", "iopo_jax.tools.fetch_model",
            "iopo_jax.tools.aot_compile", "data_pipeline.stats", "iopo_jax.tools.synthesize",
            "data_pipeline.make_demo", "iopo_jax.tools.complex_if", "data_pipeline.download", "experiments.run"]


def _flag_names(mod) -> list:
    fv = flags.FlagValues()
    mod.define_flags(fv)
    return sorted(fv)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_flag(name, capsys):
    mod = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"python -m {name}" in out
    for flag in _flag_names(mod):
        assert f"--{flag}" in out or f"--[no]{flag}" in out, flag


@pytest.mark.parametrize("name", COMMANDS)
def test_unknown_flag_is_a_usage_error(name, capsys):
    mod = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--no_such_flag=1"])
    assert e.value.code == 2 and "no_such_flag" in capsys.readouterr().err


def test_both_spellings_booleans_and_positionals():
    def define(fv):
        flags.DEFINE_integer("n", 1, "a number", flag_values=fv)
        flags.DEFINE_bool("quiet", False, "a switch", flag_values=fv)

    a, pos = cli.parse("prog", "doc", define, ["x.json", "--n", "3", "--quiet", "y.json"])
    b, _ = cli.parse("prog", "doc", define, ["--n=3", "--quiet", "x.json"])
    c, _ = cli.parse("prog", "doc", define, ["--noquiet"])
    assert (a.n, a.quiet, pos) == (3, True, ["x.json", "y.json"]) and (b.n, b.quiet) == (3, True)
    assert c.quiet is False
    with pytest.raises(SystemExit) as e:
        cli.parse("prog", "doc", define, ["--n=three"])
    assert e.value.code == 2
