"""The documentation: the MkDocs site builds with --strict, and every ```python block of
README.md and docs/*.md runs.

Each page's python blocks run in order in one namespace, in a temporary working directory.
Blocks fenced as bash, console, text (anything but python) are not run. A python block
that cannot run here is preceded by ``<!-- no-test: reason -->``; the reason is required
and such blocks must stay rare (NO_TEST_LIMIT).
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: At most this many python blocks in all the pages may be marked no-test.
NO_TEST_LIMIT = 3
#: The README is a front page a newcomer reads in five minutes.
README_MAX_LINES = 200

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_NO_TEST = re.compile(r"^\s*<!--\s*no-test:(?P<reason>.*?)-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    source: str
    no_test: str | None  # the reason, for a block marked no-test


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their language and marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        language = opening["info"].strip().split(" ")[0].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^ *{re.escape(fence)}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.name}:{i + 1}: unclosed code fence")
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = _NO_TEST.match(previous)
        no_test = marker["reason"].strip() if marker else None
        blocks.append(Block(page, i + 1, language, "\n".join(body) + "\n", no_test))
        i = j + 1
    return blocks


def _python_pages() -> list[Path]:
    return [p for p in PAGES if any(b.language == "python" for b in code_blocks(p))]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory):
    """A private XDG cache for the whole module: the lab's MNIST-1D is generated once and the
    user's own cache is never touched."""
    return tmp_path_factory.mktemp("docs-xdg-cache")


@pytest.mark.parametrize("page", _python_pages(), ids=_page_id)
def test_python_blocks_run(page, tmp_path, monkeypatch, docs_cache):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(docs_cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python` run from that directory
    threads = torch.get_num_threads()
    namespace: dict = {"__name__": "__docs__"}
    try:
        for block in code_blocks(page):
            if block.language != "python" or block.no_test is not None:
                continue
            where = f"{_page_id(page)}:{block.line}"
            try:
                exec(compile(block.source, where, "exec"), namespace)
            except Exception as error:
                raise AssertionError(
                    f"the python block at {where} failed: {type(error).__name__}: {error}\n"
                    f"{block.source}"
                ) from error
    finally:
        torch.set_num_threads(threads)


def test_no_test_markers_are_rare_and_justified():
    marked = [b for p in PAGES for b in code_blocks(p) if b.no_test is not None]
    for block in marked:
        where = f"{_page_id(block.page)}:{block.line}"
        assert block.language == "python", f"{where}: no-test marks a non-python block"
        assert len(block.no_test) >= 20, f"{where}: no-test needs a reason, got {block.no_test!r}"
    assert len(marked) <= NO_TEST_LIMIT, (
        f"{len(marked)} python blocks are marked no-test (at most {NO_TEST_LIMIT}): "
        f"{[f'{_page_id(b.page)}:{b.line}' for b in marked]}"
    )


def test_every_python_block_compiles():
    """Marked blocks are not run, but must still be valid Python."""
    for page in PAGES:
        for block in code_blocks(page):
            if block.language == "python":
                compile(block.source, f"{_page_id(page)}:{block.line}", "exec")


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    for command in ("make demo", "make test", 'pip install ".[lab]"'):
        assert command in text


#: Modules whose public names the API reference may show; internal modules may move.
PUBLIC_MODULES = {
    "batchnorm",
    "batchnorm.functional",
    "batchnorm.ops",
    "batchnorm.distributed",
    "batchnorm.reference",
    "batchnorm.lab",
}


def test_api_reference_names_are_public():
    """`::: name` entries name public objects only, never internal module paths."""
    import batchnorm
    import batchnorm.lab

    exported = {"batchnorm": set(batchnorm.__all__), "batchnorm.lab": set(batchnorm.lab.__all__)}
    names = re.findall(r"^::: *(\S+)", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert names
    for name in names:
        assert not any(part.startswith("_") for part in name.split(".")), name
        module, _, attr = name.rpartition(".")
        if name in PUBLIC_MODULES:
            continue
        assert module in PUBLIC_MODULES, f"{name}: not in a public module {sorted(PUBLIC_MODULES)}"
        if module in exported:
            assert attr in exported[module], f"{name}: not exported by {module}.__all__"


def test_mkdocs_build_strict(tmp_path):
    """A broken link or anchor, a page missing from the nav or a stale API name fails."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("batchnorm.BatchNorm2d", "batchnorm.fold", "batchnorm.functional.batch_norm"):
        assert name in api
    # Layers whose __init__ passes options on get their real signature (full_signature sets
    # it at import; docs/griffe_full_signature.py shows it), never *args / **kwargs.
    signatures = _signatures(api)
    assert "virtual_batch_size: int, eps: float" in signatures["batchnorm.GhostBatchNorm2d"]
    assert "(num_features: int, eps: float" in signatures["batchnorm.BatchNormAct2d"]
    assert "bias: bool = True" in signatures["batchnorm.SyncBatchNorm"]
    for name, signature in signatures.items():
        assert not re.search(r"\*\*?(args|kwargs|options)\b", signature), (name, signature)


def _signatures(api: str) -> dict[str, str]:
    """The signature shown under each heading of the API page, as text on one line."""
    found = re.findall(
        r'<h3 id="([\w.]+)".*?<div class="doc-signature[^"]*">(.*?)</div>', api, flags=re.S
    )
    text = {name: html.unescape(re.sub(r"<[^>]+>", "", block)) for name, block in found}
    return {
        name: re.sub(r"\s+", " ", t).replace("( ", "(").replace(", )", ")")
        for name, t in text.items()
    }
