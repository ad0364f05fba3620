"""The README's Layout section and docs/CONTRIBUTING.md name only files and folders that exist, and every
module of the three layers is named in the Layout section (so the map cannot drift from the tree)."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
TOP = ("data_pipeline", "iopo_jax", "evaluation", "configs", "experiments", "docs", "notebooks", "bench", "tests")


def _layout() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Layout\n")
    return text[start:text.index("\n## ", start + 1)]


NOT_FILES = {"report.md"}  # files the code writes into a workdir, named as outputs


def _named_files(text: str) -> set[str]:
    names = set(re.findall(r"[A-Za-z_][\w/]*\.(?:py|md)\b", text)) - NOT_FILES
    return {n for n in names if not n.endswith("/x.py")}  # "configs/x.py": a placeholder for the reader's file


def _exists(name: str) -> bool:
    """``name`` (e.g. ``weights.py``, ``models/weights.py``, ``docs/rl.md``) is a file somewhere in the tree."""
    if (REPO / name).exists():
        return True
    return any(p.as_posix().endswith("/" + name) for top in TOP for p in (REPO / top).rglob(pathlib.Path(name).name))


def test_layout_and_guide_name_existing_files():
    for where, text in (("README.md Layout", _layout()), ("docs/CONTRIBUTING.md", (REPO / "docs/CONTRIBUTING.md").read_text())):
        missing = sorted(n for n in _named_files(text) if not _exists(n))
        assert not missing, f"{where} names files that do not exist: {missing}"


def test_every_module_is_in_the_layout():
    layout = _layout()
    named = {pathlib.Path(n).name for n in _named_files(layout)} | set(re.findall(r"\b(\w+)(?:,| and| \()", layout))
    missing = []
    for top in ("data_pipeline", "iopo_jax", "evaluation"):
        for p in sorted((REPO / top).rglob("*.py")):
            if p.name == "__init__.py":
                continue
            if p.name not in named and p.stem not in named:
                missing.append(p.relative_to(REPO).as_posix())
    assert not missing, f"modules the README Layout section does not name: {missing}"


def test_checker_sees_a_missing_file():
    assert not _exists("no_such_module_anywhere.py") and _exists("policy_loss.py") and _exists("docs/rl.md")


def test_no_script_shadows_a_package():
    """``python bench/x.py`` puts bench/ first on sys.path: a script named like one of our packages would
    shadow it for every import behind it (bench/data_pipeline.py once broke bench/sampling.py)."""
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    for folder in ("bench", "notebooks", "experiments", "tests"):
        clash = sorted(p.name for p in (REPO / folder).glob("*.py") if p.stem in packages)
        assert not clash, f"{folder}/ holds scripts named like the packages {sorted(packages)}: {clash}"
