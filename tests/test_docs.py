"""The docs a newcomer reads: the README stays short and its links resolve, the MkDocs site builds
strictly (broken links, missing pages or snippets, API reference errors all fail), and the commands
whose output the pages show still run and still print what the pages include."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import gen_console  # noqa: E402  (docs/gen_console.py: the commands the pages show)


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    return []


def _nav() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    return re.findall(r"^\s*-\s*(?:\"[^\"]*\"|[^:\n]*):\s*(\S+\.md)\s*$", text, re.M)


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)\)", text)
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = _nav()
    assert "export_contents.md" in nav and "api.md" in nav
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "console" not in p.parts}
    assert on_disk - set(nav) == set(), f"pages missing from the nav in mkdocs.yml: {sorted(on_disk - set(nav))}"
    assert set(nav) - on_disk == set(), f"nav entries without a page: {sorted(set(nav) - on_disk)}"


def test_every_console_file_is_shown_and_every_command_has_one():
    included = set()
    for page in DOCS.rglob("*.md"):
        included.update(re.findall(r'--8<-- "console/([^"]+)"', page.read_text()))
    expected = {f"{name}.txt" for name, _, _ in gen_console.COMMANDS} | {"export_files.md", "export_io_1024.md"}
    assert expected <= {p.name for p in (DOCS / "console").iterdir()}, "run python docs/gen_console.py"
    assert expected == included, f"console files not shown: {sorted(expected - included)}; " \
                                 f"shown but not generated: {sorted(included - expected)}"


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the [docs] extra (mkdocs, mkdocs-material, mkdocstrings)")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("SamSession", "merge_peft", "merge_and_export", "finetune"):
        assert name in api, f"{name} missing from the API reference"


@pytest.mark.slow
def test_docs_commands_still_run_and_print_what_the_pages_show(tmp_path):
    # About a minute on 2 cores: the tiny model, 128 px data, 6 training steps, an fp32-only export.
    proc = subprocess.run([sys.executable, str(DOCS / "gen_console.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name, command, _ in gen_console.COMMANDS:
        fresh = (tmp_path / f"{name}.txt").read_text().splitlines()
        shown = (DOCS / "console" / f"{name}.txt").read_text().splitlines()
        assert shown[0] == fresh[0] == f"$ {command}"
        # Figures (errors, timings) may move in the last digits; the lines' wording may not.
        words = lambda lines: [re.sub(r"[-+]?\d[\d.,e+-]*", "#", line) for line in lines]  # noqa: E731
        # Every line the docs show must still be printed (extra lines, e.g. a library's warning on
        # another machine, are allowed).
        stale = [line for line, w in zip(shown, words(shown)) if w not in words(fresh)]
        assert not stale, f"docs/console/{name}.txt is stale (run python docs/gen_console.py): {stale}"
    files = (tmp_path / "export_files.md").read_text()
    for name in ("encoder", "split_image", "split_prompts", "split_masks", "click_decoder"):  # the default export
        assert f"| `{name}.onnx`" in files, name
