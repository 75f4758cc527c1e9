"""The written map of the house agrees with the house.

ARCHITECTURE.md's interface table lists exactly the abstract methods of
``gpubp.backends.base.Backend``; every ``gpubp/...`` path named in
ARCHITECTURE.md and README.md exists; no module in gpubp/ grows past the size
a reader can hold (600 lines).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpubp.backends.base import Backend

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def _section(text: str, title: str) -> str:
    """The body of the markdown section ``## <title>...`` up to the next ``## ``."""
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else None]


def _table_names(section: str) -> list[str]:
    """Backticked call names in the second column of the section's table rows: `name(...)` -> name."""
    names = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or set(cells[0]) <= {"-", " ", ":"} or cells[0] == "group":
            continue
        listed = re.sub(r"\(derived:[^)]*\)", "", cells[1])  # written once in Backend, not abstract
        names += [re.match(r"[A-Za-z_]\w*", m).group(0) for m in re.findall(r"`([^`]+)`", listed)]
    return names


def _derived_names(section: str) -> list[str]:
    """The names in the table's ``(derived: ...)`` notes."""
    return [n for note in re.findall(r"\(derived:([^)]*)\)", section) for n in re.findall(r"`(\w+)`", note)]


def test_architecture_lists_the_interface_exactly():
    listed = _table_names(_section((ROOT / "ARCHITECTURE.md").read_text(), "The interface"))
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
    abstract = set(Backend.__abstractmethods__)
    derived = _derived_names(_section((ROOT / "ARCHITECTURE.md").read_text(), "The interface"))
    assert derived and all(callable(getattr(Backend, n, None)) and n not in abstract for n in derived), derived
    assert set(listed) == abstract, (
        f"ARCHITECTURE.md lists {sorted(set(listed) - abstract)} that Backend lacks, "
        f"and omits {sorted(abstract - set(listed))}"
    )


def test_base_table_names_every_backend():
    """base.py's table of implementations (rows ``module.Class``) names exactly the Backend classes."""
    import importlib

    import gpubp.backends.base as base

    rows = set(re.findall(r"^\| ``(\w+)\.(\w+)``", base.__doc__ or "", re.M))
    classes = set()
    for path in (ROOT / "gpubp" / "backends").rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if "class " not in path.read_text() or mod.endswith("__init__"):
            continue
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            if isinstance(obj, type) and issubclass(obj, Backend) and obj is not Backend and obj.__module__ == mod:
                classes.add((mod.rsplit(".", 1)[1], name))
    assert rows == classes, f"base.py's table lists {sorted(rows - classes)} that do not exist, omits {sorted(classes - rows)}"


@pytest.mark.parametrize("doc", ["ARCHITECTURE.md", "README.md"])
def test_named_paths_exist(doc):
    text = (ROOT / doc).read_text()
    paths = set(re.findall(r"\b(gpubp/[\w/]+(?:\.py)?|kernels/[\w.]+\.(?:cuh|cu|h)\b|bench/[\w.]+\.(?:py|sh))", text))
    paths.discard("gpubp/_kernels")  # kernels/ as the wheel carries it, not a folder of the checkout
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_no_module_past_the_size_limit():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in (ROOT / "gpubp").rglob("*.py")}
    big = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them along a seam): {big}"
