"""Real multilingual text from Debian's ``fortunes*`` packages.

Each package installs plain-text files of short entries separated by lines holding a single
``%``; some entries carry ANSI colour codes. Files are found through ``dpkg -L`` so that the
language of a file is the language of its package, whatever its path.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import subprocess
from pathlib import Path

from obim_trainer.errors import ConfigError

logger = logging.getLogger(__name__)

FORTUNE_PACKAGES: dict[str, tuple[str, ...]] = {
    "en": ("fortunes-min", "fortunes"),
    "de": ("fortunes-de",),
    "zh": ("fortunes-zh",),
    "ru": ("fortunes-ru",),
    "es": ("fortunes-es",),
    "it": ("fortunes-it",),
    "pl": ("fortunes-pl",),
    "cs": ("fortunes-cs",),
}
FORTUNE_ROOT = "/usr/share/games/fortunes"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DRAWINGS = {"art", "ascii-art", "asciiart"}  # pictures, not language


def install_command(languages: list[str]) -> str:
    packages = sorted({p for language in languages for p in FORTUNE_PACKAGES[language]})
    return f"sudo apt-get update && sudo apt-get install -y {' '.join(packages)}"


def parse_fortunes(text: str) -> list[str]:
    """The entries of one fortune file: split on ``%`` lines, ANSI codes removed, whitespace trimmed."""
    entries, lines = [], []
    for line in ANSI_ESCAPE.sub("", text).replace("\x1b", "").splitlines():  # and stray ESC bytes
        if line.strip() == "%":
            entries.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line.rstrip())
    entries.append("\n".join(lines).strip())
    return [e for e in entries if e]


def _is_fortune_file(path: Path) -> bool:
    return (
        str(path).startswith(FORTUNE_ROOT + "/")
        and path.is_file()
        and not path.is_symlink()
        and path.suffix not in {".dat", ".u8"}
        and "off" not in path.relative_to(FORTUNE_ROOT).parts[:-1]  # offensive collections
        and path.name not in DRAWINGS
    )


def package_files(package: str) -> list[Path]:
    """The fortune files ``package`` installed (empty when it is not installed)."""
    if shutil.which("dpkg") is None:
        return []
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        return []
    return sorted(p for p in map(Path, listing.stdout.splitlines()) if _is_fortune_file(p))


def language_entries(language: str) -> list[str]:
    """Every entry of every installed package of ``language``, in file order.

    Raises :class:`ConfigError` with the command to run when the packages are missing.
    """
    if language not in FORTUNE_PACKAGES:
        raise ConfigError(f"no fortunes package for language '{language}'; choose from {', '.join(FORTUNE_PACKAGES)}")
    files = [f for package in FORTUNE_PACKAGES[language] for f in package_files(package)]
    if not files:
        raise ConfigError(
            f"no '{language}' text: Debian's {' or '.join(FORTUNE_PACKAGES[language])} is not installed; "
            f"run: {install_command([language])}"
        )
    entries = [e for f in files for e in parse_fortunes(f.read_text(encoding="utf-8", errors="replace"))]
    logger.info("%s: %d fortunes from %d files", language, len(entries), len(files))
    return entries


def split_entries(entries: list[str], eval_count: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle cut into (train, eval); duplicates are dropped first so none crosses the cut."""
    unique = list(dict.fromkeys(entries))
    if len(unique) <= eval_count:
        raise ConfigError(f"only {len(unique)} distinct entries, fewer than the {eval_count} asked for evaluation")
    random.Random(seed).shuffle(unique)
    return unique[eval_count:], unique[:eval_count]
