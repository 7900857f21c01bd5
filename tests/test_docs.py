"""The docs stay true to the code: links resolve, the committed OpenAPI file is the app's, and the
metric and setting names the docs mention exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dinserve.openapi import build_schema, render
from service.config import Settings
from service.metrics import MULTIPROCESS_DIR_ENV, Metrics
from service.schemas import ScoreResponse, parse_score_request

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_committed_openapi_is_the_apps_schema() -> None:
    committed = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert committed == render(build_schema()), "docs/openapi.json is stale: run `make openapi`"


def test_openapi_documents_the_routes() -> None:
    paths = build_schema()["paths"]
    for route in ("/score", "/healthz", "/readyz", "/model", "/metrics"):
        assert route in paths


def test_score_examples_are_valid_requests_and_responses() -> None:
    operation = build_schema()["paths"]["/score"]["post"]
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    assert examples
    defaults = Settings.model_construct()
    for name, example in examples.items():
        body = json.dumps(example["value"]).encode()
        request = parse_score_request(body, defaults.max_candidates, defaults.max_user_id_length)
        assert request.candidates, name
    answer = operation["responses"]["200"]["content"]["application/json"]["example"]
    ScoreResponse.model_validate(answer)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        assert (page.parent / path).exists(), f"{page.name} links to missing {target}"


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, "-1", "-2"... on repeats; lines inside fenced code blocks are not headings."""
    anchors: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6} (.+)", line)
        if match is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


def test_heading_anchors_follow_githubs_rule() -> None:
    text = "\n".join([
        "# The graph's lines", "```", "# not a heading", "```", "## Overload: `LIFO`",
        "### Commands", "### Commands",
    ])
    assert heading_anchors(text) == {"the-graphs-lines", "overload-lifo", "commands", "commands-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_link_anchors_name_a_heading(page: Path) -> None:
    """A link to a section survives the section being moved or renamed only if someone notices."""
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        linked = (page.parent / path) if path else page
        if linked.suffix != ".md":
            continue
        assert anchor in heading_anchors(linked.read_text(encoding="utf-8")), (
            f"{page.name} links to {target}, which names no heading"
        )


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text(encoding="utf-8")[:1500]
    assert "make demo" in head and "make test" in head


def test_every_doc_is_listed_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in [*DOCS, ROOT / "docs" / "openapi.json"]:
        assert f"docs/{doc.name}" in readme, f"README does not link docs/{doc.name}"


def test_metric_names_in_the_docs_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exposed = {m.name for m in Metrics().registry.collect()}
    # and those of a service with workers (ctr_worker_cpu_seconds instead of process_*)
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(tmp_path))
    exposed |= {m.name for m in Metrics().registry.collect()}
    # prometheus_client reports counters without their _total suffix
    exposed |= {f"{name}_total" for name in exposed}
    for page in PAGES:
        for name in set(re.findall(r"\b(ctr_[a-z_]+)\b", page.read_text(encoding="utf-8"))):
            if name.endswith(("_bucket", "_count", "_sum")):
                name = name.rsplit("_", 1)[0]
            assert name in exposed, f"{page.name} mentions unknown metric {name}"


def test_setting_names_in_the_docs_exist() -> None:
    fields = {f"CTR_{name.upper()}" for name in Settings.model_fields}
    for page in PAGES:
        for name in set(re.findall(r"\bCTR_[A-Z_]+[A-Z]\b", page.read_text(encoding="utf-8"))):
            assert name in fields, f"{page.name} mentions unknown setting {name}"
