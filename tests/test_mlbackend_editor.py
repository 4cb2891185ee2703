"""The editor's interactive request, driven in headless Chromium against a real Label Studio 1.23.2
with xdlabel's ML backend connected: log in, open a task, switch Auto-Annotation on, type a phrase
in the smart TextArea and see the suggestion appear on the ball (then accept it as a Ball region);
a second phrase on the same image is answered without downloading or encoding the image again."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from annotator.client import LabelStudioClient
from annotator.localserver import LocalLabelStudio
from index.db import upgrade
from tests.conftest import Server
from tests.test_mlbackend_interactive import Backend, Counts, _scene_image, red_iou
from xdlabel.services import Services
from xdlabel.settings import Settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle,ball"/>
    <Label value="background" stuff="true"/>
  </BrushLabels>
  <TextArea name="prompt" toName="image" editable="true" smart="true" showSubmitButton="true"/>
</View>"""


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    """The ML backend under uvicorn with the bundled model at its default size; it reads files
    with the token Label Studio hands over in /setup."""
    settings = Settings(data_dir=tmp_path / "data", ml_backend_password="s3cret")
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    server = Server(services)
    with server as url:
        yield Backend(url + "/ml", services, server.server.config.app.state.ls_connections)
    services.engine.dispose()


def test_a_phrase_typed_in_the_editor_gives_a_suggestion(backend: Backend, label_studio: LocalLabelStudio,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium package (see .ci/run)")
    from playwright.sync_api import Response, sync_playwright

    client = LabelStudioClient(label_studio.url, label_studio.token)
    project = client.sdk.projects.create(title="editor-phrase", label_config=CONFIG)
    assert project.id is not None
    folder = label_studio.files_root / "editor-phrase"
    folder.mkdir(parents=True)
    _scene_image(folder / "img0.png", 0)
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    client.sdk.projects.import_tasks(id=project.id, request=[  # type: ignore[arg-type]
        {"data": {"image": "/data/local-files/?d=editor-phrase/img0.png"}}])
    (task,) = [t["id"] for t in client.tasks(project.id)]
    client.register_ml_backend(project.id, backend.url, "xdlabel", "s3cret")
    # The task's prediction first, so that opening it asks the backend nothing: from here on the
    # counts are the interactive prompts' alone.
    client.sdk.actions.create(id="retrieve_tasks_predictions", project=project.id,
                              selected_items={"all": False, "included": [task]})
    assert all(t["predictions"] for t in client.tasks(project.id))
    counts = Counts(monkeypatch, backend.services)

    def interactive(response: Response) -> bool:
        return response.url.endswith("/interactive-annotating") and response.request.method == "POST"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(label_studio.url + "/user/login/")
        page.fill("input[name=email]", label_studio.user)
        page.fill("input[name=password]", label_studio.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{label_studio.url}/projects/{project.id}/data?task={task}")
        toggle = page.get_by_test_id("bottombar-auto-annotation-toggle")
        toggle.wait_for(state="attached", timeout=90_000)
        toggle.check(force=True)  # the switch's input is hidden behind its styled knob
        prompt = page.get_by_test_id("textarea-input")
        seconds = []
        answers = []
        for phrase in ("the red circle", "Ball: the red circle"):
            prompt.fill(phrase)
            started = time.monotonic()
            with page.expect_response(interactive, timeout=120_000) as waited:
                prompt.press("Shift+Enter")  # submits the text: Label Studio sends the interactive request
            answers.append((json.loads(waited.value.request.post_data or "{}"), waited.value.json()))
            page.get_by_text(re.compile(r"^\s*1 suggestions?\s*$")).wait_for(timeout=30_000)
            seconds.append(time.monotonic() - started)
            if len(answers) == 1:  # the first prompt on the image
                assert counts.now()[:2] == (1, 1)  # the image downloaded and encoded for the first prompt
                page.get_by_test_id("bottombar-accept-suggestions-button").click()
        assert counts.now()[:2] == (1, 1)  # ... and not again for the second
        for sent, answer in answers:
            assert sent["task"] == task and sent["context"]["result"][0]["type"] == "textarea"
            results = answer["data"]["result"]
            assert [r["value"]["brushlabels"] for r in results] == [["Ball"]], results
            assert red_iou(results[0], folder / "img0.png") > 0.5  # on the ball
        # The accepted suggestion is a region of the annotation, labelled Ball in the regions list.
        page.locator(".lsf-outliner-item").get_by_text("Ball").first.wait_for(timeout=10_000)
        page.screenshot(path=str(backend.services.settings.data_dir / "editor.png"))
        browser.close()
    print(f"editor: phrase to suggestion {seconds[0]:.2f} s (first prompt on the image), "
          f"{seconds[1]:.2f} s (second)")
    assert not errors, errors
