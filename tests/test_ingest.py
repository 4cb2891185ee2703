"""Ingestion: every class of bad input, duplicates, and a real process killed with SIGKILL mid-run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from index.db import make_engine, make_session_factory, upgrade
from index.models import Embedding
from index.models import Image as ImageRow
from tests.test_api import make_images
from xdlabel.ingest import IngestPipeline
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import Item, coco_items, folder_items, list_items


def _png(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def bad_and_odd_inputs(folder: Path) -> dict[str, bool]:
    """name -> whether it should be ingested (True) or recorded as failed (False)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    good = _png(rgb)
    cases: dict[str, tuple[bytes, bool]] = {
        "truncated.png": (good[: len(good) // 2], False),
        "zero.png": (b"", False),
        "text.png": (b"this is not an image at all", False),
        "cmyk.jpg": (b"", True),
        "sixteen_bit.png": (_png(Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16))), True),
        "palette_alpha.png": (b"", True),
        "exif_rotated.jpg": (b"", True),
        "one_pixel.png": (_png(Image.new("RGB", (1, 1), (200, 10, 10))), True),
        "bomb.png": (b"", False),
    }
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, format="JPEG")
    cases["cmyk.jpg"] = (cmyk.getvalue(), True)
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    cases["palette_alpha.png"] = (_png(palette, transparency=0), True)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    rgb.save(rotated, format="JPEG", exif=exif)
    cases["exif_rotated.jpg"] = (rotated.getvalue(), True)
    cases["bomb.png"] = (_png(Image.new("1", (9000, 9000))), False)  # 81 Mpx, tiny file
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return {name: ok for name, (_, ok) in cases.items()}


@pytest.fixture
def services(migrated_url: str, tmp_path: Path) -> Services:
    return Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=96))


def test_every_bad_input_is_recorded_and_the_job_carries_on(services: Services, tmp_path: Path) -> None:
    expected = bad_and_odd_inputs(tmp_path / "in")
    report = IngestPipeline(services, "odd", batch_size=3).run(folder_items(tmp_path / "in"))
    failed = {Path(uri).name for uri in report.failed}
    assert failed == {name for name, ok in expected.items() if not ok}
    assert len(report.added) == sum(expected.values())
    reasons = {Path(uri).name: reason for uri, reason in report.failed.items()}
    assert reasons["zero.png"] == "empty file"
    assert "pixel limit" in reasons["bomb.png"] or "DecompressionBomb" in reasons["bomb.png"]
    assert "not a readable image" in reasons["text.png"]
    with services.sessions() as session:
        rows = {Path(r.uri).name: r for r in session.scalars(select(ImageRow))}
        assert {n for n, r in rows.items() if r.status == "failed"} == failed
        assert all(rows[n].error for n in failed)
        # EXIF orientation 6 turns the stored 80x60 picture upright to 60x80
        assert (rows["exif_rotated.jpg"].width, rows["exif_rotated.jpg"].height) == (60, 80)
        assert (rows["one_pixel.png"].width, rows["one_pixel.png"].height) == (1, 1)
        assert session.scalar(select(func.count()).select_from(Embedding).where(Embedding.kind == "image")) \
            == len(report.added)
    # Rerun: nothing new, nothing duplicated, failures not retried into duplicates.
    again = IngestPipeline(services, "odd", batch_size=3).run(folder_items(tmp_path / "in"))
    assert not again.added and not again.failed and len(again.duplicates) == len(expected)
    services.engine.dispose()


def test_sources(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs" / "sub", 2)
    assert [Path(i.uri).name for i in folder_items(tmp_path / "imgs")] == ["img0.png", "img1.png"]
    (tmp_path / "list.txt").write_text("# comment\nimgs/sub/img0.png\nhttps://example.org/a.jpg\n")
    items = list(list_items(tmp_path / "list.txt"))
    assert items[0].uri == paths[0].resolve().as_uri() and items[1].uri == "https://example.org/a.jpg"
    (tmp_path / "list.csv").write_text("uri,camera\nimgs/sub/img1.png,x100\n")
    assert list(list_items(tmp_path / "list.csv")) == [Item(paths[1].resolve().as_uri(), {"camera": "x100"})]
    (tmp_path / "coco.json").write_text('{"images": [{"id": 7, "file_name": "imgs/sub/img0.png"}]}')
    assert list(coco_items(tmp_path / "coco.json"))[0].meta == {"coco_id": 7, "file_name": "imgs/sub/img0.png"}


def test_urls_to_private_addresses_are_refused(services: Services) -> None:
    report = IngestPipeline(services, "web").run([Item("http://127.0.0.1:9/x.png"), Item("ftp://host/x.png")])
    reasons = list(report.failed.values())
    assert "non-public address 127.0.0.1" in reasons[0] and "unsupported URI scheme" in reasons[1]
    services.engine.dispose()


def test_killed_ingest_resumes_with_nothing_lost_or_duplicated(tmp_path: Path) -> None:
    """A real `xdlabel ingest` process is SIGKILLed mid-run, then rerun to completion."""
    make_images(tmp_path / "photos", 24)
    data = tmp_path / "data"
    env = {**os.environ, "XDLABEL_DATA_DIR": str(data), "XDLABEL_SHORT_SIDE": "96"}
    url = f"sqlite:///{data / 'xdlabel.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    cmd = [sys.executable, "-m", "xdlabel.cli", "ingest", str(tmp_path / "photos"), "--dataset", "kill",
           "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with sessions() as s:
            done = s.scalar(select(func.count()).select_from(ImageRow))
        if done >= 6 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sessions() as s:
        partial = s.scalar(select(func.count()).select_from(ImageRow))
    assert 0 < partial < 24, f"kill landed at {partial} images; the test needs a mid-run kill"
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    with sessions() as s:
        shas = s.scalars(select(ImageRow.sha256)).all()
        image_vectors = s.scalar(select(func.count()).select_from(Embedding).where(Embedding.kind == "image"))
    assert len(shas) == 24 == len(set(shas)) == image_vectors
    # The index matches SQL after the restart (repaired if the kill fell between commit and index write).
    services = Services(Settings(data_dir=data, short_side=96))
    model = services.model
    report = services.store.sync(model.version_id, "image", model.image_dim)
    assert report.count == 24
    assert services.store.sync(model.version_id, "image", model.image_dim).action == "loaded"
    engine.dispose()


def test_a_dataset_deleted_mid_run_stops_the_run_and_no_other_dataset_gets_its_images(
        migrated_url: str, tmp_path: Path) -> None:
    """Injected: after the first batch is written, the dataset is deleted (images and vectors with it)
    and a new dataset is created at once; on SQLite it takes the deleted one's id. The run must stop
    with a clear error and the new dataset must receive nothing."""
    from index.models import Dataset
    from xdlabel.ingest import DatasetGone

    services = Services(Settings(data_dir=tmp_path / "data", database_url=migrated_url, short_side=64,
                                 caption_steps=2))
    paths = make_images(tmp_path / "photos", 8)
    swapped: list[int] = []

    def delete_and_replace(report: object) -> None:
        if swapped:
            return
        with services.sessions() as s:
            victim = s.scalars(select(Dataset).where(Dataset.name == "victim")).one()
            services.store.remove_images(s, list(s.scalars(select(ImageRow.id).where(
                ImageRow.dataset_id == victim.id))))
            s.delete(victim)
            s.commit()
            s.add(Dataset(name="innocent"))
            s.commit()
            swapped.append(s.scalars(select(Dataset.id).where(Dataset.name == "innocent")).one())

    pipeline = IngestPipeline(services, "victim", batch_size=2, progress=delete_and_replace)
    with pytest.raises(DatasetGone, match="'victim' was deleted"):
        pipeline.run([Item(p.resolve().as_uri()) for p in paths])
    with services.sessions() as s:
        assert not s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.dataset_id == swapped[0]))
        assert not s.scalar(select(func.count()).select_from(Embedding))
    if migrated_url.startswith("sqlite"):
        assert swapped[0] == pipeline.dataset_id  # the id was reused: the case that used to leak
    services.close()


def test_a_stop_is_heeded_while_skipping_stored_items(tmp_path: Path) -> None:
    """Injected: a run over 4000 items that are all stored already (one file named 4000 times) is asked
    to stop after 0.5 s; it stops within about a second instead of walking every item."""
    services = Services(Settings(data_dir=tmp_path / "data", short_side=64, caption_steps=2))
    upgrade(services.settings.sqlalchemy_url)
    photo = make_images(tmp_path / "photos", 1)[0]
    assert IngestPipeline(services, "d").run([Item(photo.resolve().as_uri())]).added
    items = [Item(photo.resolve().as_uri(), {"n": n}) for n in range(4000)]
    reports: list[int] = []
    start = time.monotonic()
    report = IngestPipeline(services, "d", should_stop=lambda: time.monotonic() - start > 0.5,
                            progress=lambda r: reports.append(len(r.duplicates))).run(items)
    assert report.cancelled and len(report.duplicates) < len(items)
    assert time.monotonic() - start < 5
    assert reports, "no progress was reported while skipping"
    services.close()
