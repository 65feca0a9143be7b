"""Every "methods.md §N" the code cites is a section heading of docs/methods.md.

Docstrings, comments and recipes point readers at ``methods.md §3.1`` and the like; the
document lives in the repository (``docs/methods.md``), and a citation of a section it does not
have sends the reader nowhere. Collected: every ``§`` reference in the source, test, benchmark,
recipe and script files (there all of them cite methods.md), and the ``methods.md §…``
references of README.md and docs/*.md. Lists (``§7.2, §7.5``) and ranges (``§6.1-6.3``) are
expanded.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
SECTION_SIGN = "\u00a7"

#: folders where every section sign cites methods.md
CODE_DIRS = ("compresskit", "benchmarks", "tests", "recipes", "scripts")
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".txt", ".toml", ".cfg"}

_NUMBER = r"\d+(?:\.\d+)*"
#: §N, §N.M, and a range §N.M-N.K (hyphen or en dash)
_CITATION = re.compile(SECTION_SIGN + rf"\s*({_NUMBER})(?:\s*[-\u2013]\s*({_NUMBER}))?")
#: in prose files: "methods.md" followed by a list of citations
_PROSE = re.compile(r"methods\.md\s*((?:" + SECTION_SIGN + rf"\s*{_NUMBER}(?:\s*[-\u2013]\s*{_NUMBER})?[\s,;and]*)+)")
_HEADING = re.compile(rf"^#{{2,6}}\s+({_NUMBER})\.?\s", re.MULTILINE)


def _expand(first: str, last: str | None) -> list[str]:
    """``6.1``–``6.3`` → 6.1, 6.2, 6.3 (a range within one section); a single number as is."""
    if last is None:
        return [first]
    head, _, low = first.rpartition(".")
    last_head, _, high = last.rpartition(".")
    if head != last_head or not low.isdigit() or not high.isdigit() or int(high) < int(low):
        return [first, last]
    prefix = f"{head}." if head else ""
    return [f"{prefix}{n}" for n in range(int(low), int(high) + 1)]


def citations_in(text: str, prose: bool = False) -> list[tuple[int, str]]:
    """(line, section) of every methods.md citation in ``text``."""
    found: list[tuple[int, str]] = []
    spans = [(m.start(1), m.group(1)) for m in _PROSE.finditer(text)] if prose else [(0, text)]
    for offset, chunk in spans:
        for m in _CITATION.finditer(chunk):
            line = text.count("\n", 0, offset + m.start()) + 1
            found.extend((line, section) for section in _expand(m.group(1), m.group(2)))
    return found


def headings(markdown: str) -> set[str]:
    return set(_HEADING.findall(markdown))


def collect_citations(root: Path = ROOT) -> list[tuple[str, int, str]]:
    """(file, line, section) for every citation in the repository's code, tests, recipes and docs."""
    found: list[tuple[str, int, str]] = []
    files: list[tuple[Path, bool]] = []
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and path.resolve() != Path(__file__).resolve():
                files.append((path, False))
    files.append((root / "README.md", True))
    files.extend((path, True) for path in sorted((root / "docs").glob("*.md")) if path.name != "methods.md")
    for path, prose in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for line, section in citations_in(text, prose=prose):
            found.append((str(path.relative_to(root)), line, section))
    return found


def missing_sections(citations: list[tuple[str, int, str]], markdown: str) -> list[str]:
    have = headings(markdown)
    return [f"{file}:{line}: methods.md {SECTION_SIGN}{section}"
            for file, line, section in citations if section not in have]


def test_every_cited_section_exists():
    citations = collect_citations()
    assert len(citations) > 50, f"expected the code's ~55 citations, found {len(citations)}"
    missing = missing_sections(citations, METHODS.read_text(encoding="utf-8"))
    assert not missing, ("docs/methods.md has no heading for these citations:\n" + "\n".join(missing))


def test_collector_reads_lists_ranges_and_prose():
    code = f"x (methods.md {SECTION_SIGN}6.1-6.3)\n# see {SECTION_SIGN}7.2, {SECTION_SIGN}7.5 and {SECTION_SIGN}12\n"
    assert [s for _, s in citations_in(code)] == ["6.1", "6.2", "6.3", "7.2", "7.5", "12"]
    prose = f"CD-MoE (methods.md {SECTION_SIGN}7) and a stray {SECTION_SIGN}99 elsewhere"
    assert [s for _, s in citations_in(prose, prose=True)] == ["7"]
    assert headings("## 7. CD-MoE\n### 7.1 Static\n#### 7.1.2 Deep\n# 99 not a section\n") == {"7", "7.1", "7.1.2"}


def test_a_removed_heading_is_reported():
    citations = collect_citations()
    cited_31 = [c for c in citations if c[2] == "3.1"]
    assert cited_31, "the code cites OWL's §3.1"
    without = re.sub(r"^### 3\.1 .*$", "", METHODS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    reported = [e for e in missing_sections(citations, without) if e.endswith(f"{SECTION_SIGN}3.1")]
    assert len(reported) == len(cited_31)
