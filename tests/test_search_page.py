"""The search page in a real headless Chromium (Debian's package, driven by Playwright) against a
real running server: type a query, see thumbnails with scores, open one with its masks."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, make_images
from xdlabel.api.auth import create_api_key
from xdlabel.ingest import ingest_files
from xdlabel.overlay import LEGEND_WIDTH, MIN_SHORT_SIDE
from xdlabel.services import Services
from xdlabel.settings import Settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    from index.db import upgrade

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    services = Services(Settings(data_dir=tmp_path / "data", database_url=url, short_side=128))
    ingest_files(services, "photos", make_images(tmp_path / "photos", 5))
    with services.sessions() as session:
        key = create_api_key(session, "browser")
    with Server(services) as base:
        yield base, key
    services.engine.dispose()


def test_search_page_shows_hits_and_masks(page_server: tuple[str, str], tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium package (see .ci/run)")
    from playwright.sync_api import sync_playwright

    base, key = page_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        page.fill("#key", "wrong-key")
        page.fill("#query", "a red circle")
        page.click("button[type=submit]")
        page.wait_for_function("document.getElementById('status').textContent.includes('invalid')")
        page.fill("#key", key)
        page.click("button[type=submit]")
        page.wait_for_selector(".hit img[src^='blob:']", timeout=30_000)
        cards = page.locator(".hit")
        assert cards.count() == 5
        scores = [float(s) for s in page.locator(".hit .score").all_inner_texts()]
        assert scores == sorted(scores, reverse=True)
        cards.first.click()
        page.wait_for_function("document.getElementById('canvas').dataset.regions !== undefined", timeout=30_000)
        width = page.evaluate("document.getElementById('canvas').width")
        assert width == 160  # the original image, drawn at full size
        assert page.locator("#detail-title").inner_text().startswith("image ")
        # The server's overlay PNG: the image scaled up to a 384 px short side, plus the legend.
        page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=30_000)
        size = page.evaluate("[document.getElementById('overlay').naturalWidth, "
                             "document.getElementById('overlay').naturalHeight]")
        scale = -(-MIN_SHORT_SIDE // 120)  # the test images are 160 x 120
        assert size[0] == 160 * scale + LEGEND_WIDTH and size[1] >= 120 * scale, size
        page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
        if os.environ.get("XDLABEL_SCREENSHOTS"):  # to look at it: the folder to copy the screenshot to
            shutil.copy(tmp_path / "search.png", Path(os.environ["XDLABEL_SCREENSHOTS"]) / "search-page.png")
        assert not errors, errors
        browser.close()


def test_stored_html_is_shown_as_text_never_run(tmp_path: Path) -> None:
    """A caption, a dataset name and metadata holding <img onerror>, <script> and <svg onload>
    payloads that would set window.__pwned: after a search the page shows them literally, nothing
    ran, no element came from them, and the API key is not in localStorage."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium package (see .ci/run)")
    from playwright.sync_api import sync_playwright

    from index.db import upgrade
    from index.models import Dataset, Image

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    services = Services(Settings(data_dir=tmp_path / "data", database_url=url, short_side=128))
    payloads = {"caption": '<img src=x onerror="window.__pwned=\'caption\'">',
                "dataset": "<script>window.__pwned='dataset'</script>",
                "meta": '<svg onload="window.__pwned=\'meta\'"></svg>'}
    ingest_files(services, "plain", make_images(tmp_path / "photos", 2))
    with services.sessions() as session:
        session.get(Dataset, 1).name = payloads["dataset"]
        for image in session.query(Image):
            image.caption, image.meta = payloads["caption"], {"note": payloads["meta"]}
        session.commit()
        key = create_api_key(session, "browser")
    try:
        with Server(services) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.fill("#key", key)
            page.fill("#query", "a circle")
            page.click("button[type=submit]")
            page.wait_for_selector(".hit img[src^='blob:']", timeout=30_000)
            page.wait_for_timeout(500)  # an onerror/onload would have fired by now
            assert page.evaluate("window.__pwned") is None
            assert page.locator(".hit").count() == 2
            assert page.locator(".hit .caption").first.inner_text() == payloads["caption"]
            assert page.locator(".hit .dataset").first.inner_text() == payloads["dataset"]
            assert page.locator(".hit .meta").first.inner_text() == f"note: {payloads['meta']}"
            # the only elements inside the cards are the ones the page made
            assert page.evaluate("document.querySelectorAll('#results script, #results svg').length") == 0
            assert page.evaluate("document.querySelectorAll('#results img').length") == 2
            assert page.evaluate("Object.keys(localStorage).length") == 0
            assert page.evaluate("sessionStorage.getItem('xdlabel-key')") == key
            assert not errors, errors
            browser.close()
    finally:
        services.engine.dispose()


def test_overlay_png_lists_the_stored_regions(page_server: tuple[str, str]) -> None:
    """GET /v1/images/{id}/overlay: a PNG with one legend row per stored region; 401 without a key, 404 for
    an id that is not there."""
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from xdlabel.overlay import PALETTE

    base, key = page_server
    with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=60) as client:
        regions = client.get("/v1/images/1/regions").json()
        answer = client.get("/v1/images/1/overlay")
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        picture = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"))
        record = client.get("/v1/images/1").json()
        width = record["width"] * -(-MIN_SHORT_SIDE // min(record["width"], record["height"]))
        assert picture.shape[1] == width + LEGEND_WIDTH
        rows = [tuple(picture[34 + 22 * i + 8, width + 18]) for i in range(len(regions) + 1)]
        assert rows[:len(regions)] == [PALETTE[i % len(PALETTE)] for i in range(len(regions))]
        assert rows[len(regions)] == (255, 255, 255)  # no more rows than regions
        assert client.get("/v1/images/999999/overlay").status_code == 404
        assert httpx.get(base + "/v1/images/1/overlay").status_code == 401
