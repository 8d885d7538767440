"""Fortune files parsed as Debian ships them, and the language split of the installed packages."""

from __future__ import annotations

import pytest

from obim_trainer.demo.fortunes import (
    FORTUNE_PACKAGES,
    language_entries,
    package_files,
    parse_fortunes,
    split_entries,
)
from obim_trainer.errors import ConfigError


def test_entries_split_on_percent_lines_without_ansi_codes():
    text = "First one\n  -- someone\n%\n\x1b[33m要有礼貌\x1b[m\n%\n%\n100% sure\n%\n"
    assert parse_fortunes(text) == ["First one\n  -- someone", "要有礼貌", "100% sure"]


def test_the_split_is_seeded_disjoint_and_without_duplicates():
    entries = [f"entry {i % 50}" for i in range(80)]  # 30 duplicates
    train, held_out = split_entries(entries, 10, seed=3)
    assert len(held_out) == 10 and len(train) == 40
    assert not set(train) & set(held_out)
    assert split_entries(entries, 10, seed=3) == (train, held_out)
    assert split_entries(entries, 10, seed=4) != (train, held_out)
    with pytest.raises(ConfigError, match="only 50 distinct entries"):
        split_entries(entries, 50, seed=0)


def test_an_unknown_language_names_the_known_ones():
    with pytest.raises(ConfigError, match="no fortunes package for language 'xx'; choose from en, de"):
        language_entries("xx")


def test_a_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(FORTUNE_PACKAGES, "zz", ("fortunes-zz-not-a-package",))
    with pytest.raises(ConfigError, match="sudo apt-get update && sudo apt-get install -y fortunes-zz-not-a-package"):
        language_entries("zz")


@pytest.mark.skipif(
    not package_files("fortunes-zh"), reason="fortunes-zh is not installed (scripts/install_fortunes.sh)"
)
def test_installed_packages_give_text_in_their_language():
    def cjk_share(texts: list[str]) -> float:
        chars = "".join("".join(texts).split())  # indentation is most of some poems
        return sum("\u4e00" <= c <= "\u9fff" for c in chars) / len(chars)

    english, german, chinese = (language_entries(x) for x in ("en", "de", "zh"))
    assert min(len(english), len(german), len(chinese)) > 1000
    assert cjk_share(chinese) > 0.3 and cjk_share(english) < 0.001
    assert sum(t.count("ä") + t.count("ö") + t.count("ü") for t in german) > 1000
    assert not any("\x1b" in t for t in chinese)
    assert all(p.suffix not in {".dat", ".u8"} and not p.is_symlink() for p in package_files("fortunes-de"))
