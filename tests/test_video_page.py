"""The search page's moments in a real headless Chromium against a real server: a moment card plays
its video from the moment's start (media fragment on the verified bytes) and shows the best frame
with its masks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from index.db import upgrade
from tests.conftest import Server
from tests.test_search_page import CHROMIUM, FLAGS
from tests.videoclips import red_circle_clip, still_clip
from xdlabel.api.auth import create_api_key
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import folder_items
from xdlabel.video import Sampling
from xdlabel.video_ingest import VideoPipeline


def test_a_moment_plays_from_its_start_and_shows_its_best_frame(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium package (see .ci/run)")
    from playwright.sync_api import sync_playwright

    clips = tmp_path / "clips"
    red_circle_clip(clips / "a.webm", seconds=6.0, appear=2.0, leave=4.0)  # VP9: any Chromium build plays it
    still_clip(clips / "b.webm", "triangle", "yellow", seconds=4.0)
    services = Services(Settings(data_dir=tmp_path / "data", short_side=64, caption_steps=2))
    upgrade(services.settings.sqlalchemy_url)
    assert not VideoPipeline(services, "d", sampling=Sampling(fps=2)).run(folder_items(clips)).failed
    with services.sessions() as session:
        key = create_api_key(session, "browser")
    with Server(services) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        page.fill("#key", key)
        page.fill("#query", "a red circle")
        page.check("#moments")
        page.click("button[type=submit]")
        page.wait_for_selector(".moment img[src^='blob:']", timeout=30_000)
        first = page.locator(".moment").first
        assert "2.0–4.0 s" in first.inner_text() and "a.webm" in first.inner_text()
        first.click()
        page.wait_for_function("document.getElementById('player').readyState >= 1", timeout=30_000)
        player = page.evaluate("(() => { const v = document.getElementById('player');"
                               " return [v.currentTime, v.duration, v.src, v.dataset.range]; })()")
        assert 2.0 <= player[0] <= 4.0 and abs(player[1] - 6.0) < 0.2, player  # started at the fragment
        assert player[2].startswith("blob:") and player[2].endswith("#t=2,4") and player[3] == "2,4"
        page.wait_for_function("document.getElementById('canvas').dataset.regions !== undefined", timeout=30_000)
        assert page.evaluate("document.getElementById('canvas').width") == 160  # the best frame, full size
        page.screenshot(path=str(tmp_path / "moments.png"), full_page=True)
        if os.environ.get("XDLABEL_SCREENSHOTS"):
            shutil.copy(tmp_path / "moments.png", Path(os.environ["XDLABEL_SCREENSHOTS"]) / "moments-page.png")
        assert not errors, errors
        browser.close()
    services.close()
