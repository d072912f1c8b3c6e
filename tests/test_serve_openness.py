"""The playground's Openness view: GET /v1/tinkerlm/models/{name}/openness and .../card on a live loopback server
(a merge of two tiny stored models, so the lineage has two levels), and the view itself in a real headless Chromium
(class badge, component table, lineage graph as SVG, the model card rendered with its HTML escaped)."""

from __future__ import annotations

import httpx
import pytest
from test_serve import live_server
from test_serve_playground import ARGS, CHROMIUM
from tiny import make_hf_model

import tinkerlm
from tinkerlm import store
from tinkerlm.merge import merge
from tinkerlm.openness import assess
from tinkerlm.serve import server as server_mod

KEY = "test-key"


def stored(tmp_path, name: str, seed: int, licence: str) -> None:
    d = tmp_path / "src" / name
    make_hf_model("llama", d, seed=seed)
    (d / "README.md").write_text(f"---\nlicense: {licence}\n---\n# {name}\n")
    store.pull(str(d), name=name, progress=False)


@pytest.fixture
def kid(tmp_path):
    """`kid`: a SLERP merge of stored tiny models `a` (Apache-2.0, the base) and `b` (MIT); served as "kid"."""
    stored(tmp_path, "a", 0, "apache-2.0")
    stored(tmp_path, "b", 1, "mit")
    recipe = {
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": 0.5},
        "models": [{"model": "a"}, {"model": "b"}],
    }
    merge(recipe, "kid", progress=False)
    return tinkerlm.load("kid")


def test_openness_and_card_endpoints(tmp_path, kid):
    make_hf_model("llama", tmp_path / "raw")
    models = {"kid": kid, "raw": tinkerlm.load(str(tmp_path / "raw"))}
    with live_server(models, api_key=KEY) as (base, _):
        auth = {"Authorization": f"Bearer {KEY}"}
        r = httpx.get(f"{base}/v1/tinkerlm/models/kid/openness", headers=auth)
        assert r.status_code == 200, r.text
        d = r.json()
        want = assess("kid").to_json()
        for k in ("format", "model", "class", "label", "licence", "obligations", "components", "lineage", "osaid"):
            assert d[k] == want[k], k
        assert d["model"] == "kid:latest" and d["format"] == "tinkerlm-openness/1"
        parents = {p["name"]: p for p in d["lineage"]["parents"]}
        assert set(parents) == {"a:latest", "b:latest"}
        assert parents["a:latest"]["relation"] == "base" and parents["b:latest"]["relation"] == "merge-input"
        assert parents["b:latest"]["licence"] == "mit"

        # the served model's store ref, and an ancestor that is stored but not served, answer too
        assert httpx.get(f"{base}/v1/tinkerlm/models/kid:latest/openness", headers=auth).json()["model"] == "kid:latest"
        assert httpx.get(f"{base}/v1/tinkerlm/models/b/openness", headers=auth).json()["licence"] == "mit"

        r = httpx.get(f"{base}/v1/tinkerlm/models/kid/card", headers=auth)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
        assert "kid:latest" in r.text and "apache-2.0" in r.text

        for name, code in [("nope", "model_not_found"), ("Bad!Name", "model_not_found"), ("raw", "model_not_stored")]:
            for leaf in ("openness", "card"):
                r = httpx.get(f"{base}/v1/tinkerlm/models/{name}/{leaf}", headers=auth)
                assert r.status_code == 404, (name, leaf)
                err = r.json()["error"]
                assert err["code"] == code and err["param"] == "model" and name in err["message"]

        assert httpx.get(f"{base}/v1/tinkerlm/models/kid/openness").status_code == 401
        assert httpx.get(f"{base}/v1/tinkerlm/models/kid/card").status_code == 401
        # per-model paths are counted under their template, so made-up names cannot grow /metrics
        text = httpx.get(f"{base}/metrics", headers=auth).text
        assert 'path="/v1/tinkerlm/models/{name}/openness",status="200"' in text
        assert 'path="/v1/tinkerlm/models/{name}/card",status="404"' in text
        assert "/models/nope/" not in text


HOSTILE = (
    "\n\n## From someone else's files\n\n<script>window.pwned = 1</script>\n\n"
    '| field | value |\n|---|---|\n| note | <img src=x onerror="window.pwned = 2"> |\n\n'
    "[click](javascript:window.pwned=3) [docs](https://example.org/docs)\n"
)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_playground_openness_view(kid, monkeypatch):
    from playwright.sync_api import sync_playwright

    real = server_mod._card
    monkeypatch.setattr(server_mod, "_card", lambda state, name: real(state, name) + HOSTILE)
    want = assess("kid").to_json()
    with live_server({"kid": kid}) as (base, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            page.click("#tab-openness")
            page.wait_for_selector("#card h2", timeout=30000)

            assert page.text_content("#open-title") == "kid:latest"
            assert page.text_content("#class-badge") == want["label"]
            assert page.get_attribute("#class-badge", "class") == f"badge cls-{want['class']}"
            row = page.query_selector("#components tr[data-component='Model parameters (Final)']")
            comp = next(c for c in want["components"] if c["name"] == "Model parameters (Final)")
            assert row.get_attribute("class").split()[0] == "st-" + comp["status"]
            assert [td.text_content() for td in row.query_selector_all("td")][:4] == [
                "Model parameters (Final)",
                "III",
                {"included": "yes", "missing": "no", "unlicensed": "no licence", "invalid": "not open"}[comp["status"]],
                comp["licence"] or "-",
            ]
            assert len(page.query_selector_all("#components tbody tr")) == len(want["components"])
            assert len(page.query_selector_all("#progress .bar-track")) == 3

            # the lineage graph: kid at the root, its two parents one level down, edges named by relation
            nodes = {n.get_attribute("data-name"): n for n in page.query_selector_all("#lineage svg g.node")}
            assert set(nodes) == {"kid:latest", "a:latest", "b:latest"}
            assert "root" in nodes["kid:latest"].get_attribute("class")
            assert nodes["b:latest"].get_attribute("data-licence") == "mit"
            assert "licence: mit" in nodes["b:latest"].text_content()
            edges = {
                (e.get_attribute("data-from"), e.get_attribute("data-to"), e.get_attribute("data-relation"))
                for e in page.query_selector_all("#lineage svg path.edge")
            }
            assert edges == {("kid:latest", "a:latest", "base"), ("kid:latest", "b:latest", "merge-input")}
            assert {t.text_content() for t in page.query_selector_all("#lineage svg text.relation")} == {
                "base",
                "merge-input",
            }

            # the card: rendered Markdown, with the HTML in it shown as text and never run
            card = page.text_content("#card")
            assert "<script>window.pwned = 1</script>" in card and '<img src=x onerror="window.pwned = 2">' in card
            assert page.query_selector("#card script") is None and page.query_selector("#card img") is None
            assert page.query_selector("#card table td") is not None
            hrefs = [a.get_attribute("href") for a in page.query_selector_all("#card a")]
            assert "https://example.org/docs" in hrefs and not any("javascript" in (h or "") for h in hrefs)
            assert page.evaluate("window.pwned") is None

            # clicking a parent shows that model's openness
            nodes["b:latest"].click()
            page.wait_for_function("document.querySelector('#open-title').textContent === 'b:latest'")
            page.wait_for_selector("#lineage svg g.node.root[data-name='b:latest']")
            assert page.text_content("#open-licence") == "mit"
            assert page.is_visible("#open-back")
        finally:
            browser.close()
