"""Files shipped inside the package: configs, plans and the Slurm worker template.

In a checkout ``src/stagetune/conf`` and ``src/stagetune/slurm`` are links to the
repository's ``conf/`` and ``slurm/`` (one copy of each file); a wheel or sdist
holds the files themselves (``[tool.setuptools.package-data]``).  A config is
named by its path under ``conf/`` without ``.ini``, with ``@`` in front where a
file is expected: ``--read-ini @optim/model-sm``, ``stagetune plan @plans/demo
status``.  ``stagetune list-configs`` lists them.
"""

from __future__ import annotations

import re
from pathlib import Path

from stagetune.errors import ConfigError

__all__ = [
    "PACKAGE_DIR",
    "CONF_DIR",
    "SLURM_DIR",
    "PREFIX",
    "config_names",
    "describe",
    "resolve",
    "slurm_templates",
]

#: The installed package's directory.
PACKAGE_DIR = Path(__file__).resolve().parent
#: Shipped configs (``*.ini``) and plans (``plans/*.ini``).
CONF_DIR = PACKAGE_DIR / "conf"
#: Shipped Slurm job templates (``*.sbatch``).
SLURM_DIR = PACKAGE_DIR / "slurm"
#: What marks a packaged name where a path is expected.
PREFIX = "@"


def config_names() -> list[str]:
    """Every packaged config and plan by name (``demo``, ``optim/model-sm``, ``plans/demo``), sorted."""
    if not CONF_DIR.is_dir():
        return []
    return sorted(p.relative_to(CONF_DIR).with_suffix("").as_posix() for p in CONF_DIR.rglob("*.ini"))


def describe(path: Path) -> str:
    """The first sentence of a shipped file's leading comment (its summary), or ``""``."""
    words: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#!"):
            continue
        if not stripped.startswith(("#", ";")):
            break
        words += stripped.lstrip("#; ").split()
        text = " ".join(words)
        end = re.search(r"[.:](\s|$)", text)
        if end:
            return text[: end.start()]
    return " ".join(words)


def resolve(path: str | Path, what: str = "config") -> Path:
    """``path`` itself, or the packaged file an ``@NAME`` names.

    Args:
        path: A file path, or ``@NAME`` (``.ini`` optional).
        what: How the file is used, for the message (``config``, ``plan``).

    Raises:
        ConfigError: ``@NAME`` names no packaged file; lists those that exist.
    """
    text = str(path)
    if not text.startswith(PREFIX):
        return Path(path)
    name = text[len(PREFIX):].removesuffix(".ini").strip("/")
    found = CONF_DIR / f"{name}.ini"
    if name and ".." not in Path(name).parts and found.is_file():
        return found
    names = config_names()
    plans = [n for n in names if n.startswith("plans/")]
    offer = plans if what == "plan" and plans else names
    listed = ", ".join(PREFIX + n for n in offer) if offer else "none (is the package installed whole?)"
    raise ConfigError(f"{text}: no packaged {what} named {name!r}; packaged: {listed} (stagetune list-configs)")


def slurm_templates() -> dict[str, Path]:
    """Shipped Slurm templates by name (file name without ``.sbatch``)."""
    if not SLURM_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SLURM_DIR.glob("*.sbatch"))}
