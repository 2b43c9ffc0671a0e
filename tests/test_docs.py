"""The README and docs/ as a reader follows them: every link lands on a file and a
heading that exist, every test a page cites as proof exists, and the README stays a
README (its length bounded, no dated measurements: those live in RESULTS.md)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED_TEST = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")


def anchors(path):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    slugs = set()
    for heading in re.findall(r"^#+\s+(.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_lands_on_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_a_page_cites_exists(page):
    missing = [f"{module}::{name}" for module, name in CITED_TEST.findall(page.read_text())
               if not re.search(rf"^def {name}\(", (ROOT / "tests" / module).read_text(), flags=re.M)
               if (ROOT / "tests" / module).exists()] + \
              [module for module, _ in CITED_TEST.findall(page.read_text()) if not (ROOT / "tests" / module).exists()]
    assert missing == []


def test_the_readme_is_short_and_leaves_dated_measurements_to_results():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b(?!\))", re.sub(r"\([^)]*RESULTS\.md[^)]*\)", "", text))
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert not re.search(r"\(tested\b", page.read_text()), page.name
