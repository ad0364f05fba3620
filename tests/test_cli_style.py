"""One command-line style (absl flags through data_pipeline.cli) for every command: --help lists every flag and
exits 0, a bad command line exits 2 naming the problem, ``--flag value`` and ``--flag=value`` mean the same, a
list flag is one comma list whose bad item is named."""
import importlib
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from conftest import REPO
from data_pipeline import cli

COMMANDS = ["data_pipeline.tokenizer", "iopo_jax.tools.make_tiny_model", "iopo_jax.tools.fetch_model",
            "iopo_jax.tools.aot_compile", "data_pipeline.stats", "iopo_jax.tools.synthesize",
            "data_pipeline.make_demo", "iopo_jax.tools.complex_if", "data_pipeline.download", "experiments.run"]
# Commands with their flags on absl's global FLAGS (an ml_collections --config, or flags defined at import), started
# by cli.run_app; run in a subprocess. Modules by name, benchmark scripts by path.
APP_COMMANDS = ["iopo_jax.train", "iopo_jax.export", "iopo_jax.sampling.generate", "iopo_jax.sampling.serve",
                "evaluation.run", "evaluation.before_after", "evaluation.compare",
                "bench/rl_step.py", "bench/sampling.py", "bench/serve_load.py", "bench/trace_prompts.py", "bench/decode_attention.py",
                "bench/dense_dots.py"]
PACKAGES = ("data_pipeline", "iopo_jax", "evaluation", "experiments")
MAIN_BLOCK = re.compile(r'^if __name__ == "__main__":', re.M)
DEFINED_FLAG = re.compile(r'(?:DEFINE_[a-z_]+|define_list)\(\s*"(\w+)"')


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


def _source(name: str) -> str:
    path = name if name.endswith(".py") else name.replace(".", "/") + ".py"
    with open(REPO / path, encoding="utf-8") as f:
        return f.read()


def test_every_command_is_checked():
    """Every module of the packages that runs as a command is in COMMANDS or APP_COMMANDS."""
    found = set()
    for pkg in PACKAGES:
        for root, _, files in os.walk(REPO / pkg):
            for fn in files:
                if fn.endswith(".py"):
                    mod = os.path.relpath(os.path.join(root, fn), REPO)[:-3].replace(os.sep, ".")
                    if MAIN_BLOCK.search(_source(mod)):
                        found.add(mod)
    assert found == set(COMMANDS) | {m for m in APP_COMMANDS if not m.endswith(".py")}


@pytest.mark.parametrize("name", APP_COMMANDS)
def test_app_command_help_exits_0_listing_every_flag(name):
    cmd = [sys.executable, name] if name.endswith(".py") else [sys.executable, "-m", name]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd + ["--help"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    defined = DEFINED_FLAG.findall(_source(name))
    assert defined
    for flag in defined:
        assert f"--{flag}" in p.stdout or f"--[no]{flag}" in p.stdout, flag


@pytest.mark.parametrize("item,bad,message", [(int, "--xs=1,two", "item 'two' is not a valid int"),
                                              (float, "--xs=0.5,x", "item 'x' is not a valid float")])
def test_list_flag_names_the_flag_and_the_bad_item(item, bad, message, capsys):
    def define(fv):
        cli.define_list("xs", [], "numbers", fv, item)
        cli.define_list("ys", ["a"], "letters", fv, choices=("a", "b"))

    fv, _ = cli.parse("prog", "doc", define, ["--xs", "1, 2", "--ys=b,a"])
    assert fv.xs == [item("1"), item("2")] and fv.ys == ["b", "a"]
    assert cli.parse("prog", "doc", define, [])[0].ys == ["a"]
    for argv, what in (([bad], message), (["--ys=a,c"], "unknown item 'c'; choose from a, b")):
        with pytest.raises(SystemExit) as e:
            cli.parse("prog", "doc", define, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and argv[0].split("=")[0] in err and what in err, err


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


BOOL_FLAG = re.compile(r'DEFINE_bool(?:ean)?\(\s*"(\w+)"')


def test_switches_are_named_positively():
    """absl gives every boolean --name and --noname; a flag named no_x would read --no_x / --nono_x, and
    two spellings of one switch across commands (e.g. --no_progress next to --noprogress) is what this
    stops."""
    bad = []
    for name in COMMANDS + APP_COMMANDS:
        bad += [f"{name}: --{f}" for f in BOOL_FLAG.findall(_source(name)) if f.startswith("no")]
    assert not bad, bad
