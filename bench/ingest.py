"""Ingestion throughput: end to end (files -> SQL + FAISS) against the model alone, same images.

End to end runs ``IngestPipeline`` on image files (fetch, decode, model, RLE-encode regions,
write SQL rows and vectors, one transaction per batch). Model only runs the same model work
(encode, image and region embeddings, captions) on the same images already decoded in memory.
The ratio says how well decoding and writing hide behind the model (goal: >= 90%).
The video row does the same for one H.264 video (640x480, 25 fps, moving shapes) sampled at
--video-fps: end to end runs ``VideoPipeline`` (read, hash, decode in a thread, sample, model, write);
model only runs the model on the same sampled frames already decoded in memory.
Random weights (timing only). Prints a table; not a test.

    python bench/ingest.py [--config focalt] [--images 16] [--batch-size 4] [--short-side 512]
                           [--video-frames 16] [--video-fps 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from index.db import upgrade
from xdecoder import Predictor, build_model
from xdecoder.predictor import PredictorSettings
from xdlabel.ingest import IngestPipeline
from xdlabel.services import ModelInfo, Services
from xdlabel.settings import Settings
from xdlabel.sources import folder_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="focalt")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--short-side", type=int, default=512)
    parser.add_argument("--video-frames", type=int, default=16, help="sampled frames of the video row (0: none)")
    parser.add_argument("--video-fps", type=float, default=2.0, help="video sampling rate")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.config)
    predictor = Predictor(model, device="cpu", settings=PredictorSettings(short_side=args.short_side))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        arrays = []
        for i in range(args.images):
            array = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
            Image.fromarray(array).save(folder / f"{i:03d}.jpg", quality=90)
            arrays.append(np.asarray(Image.open(folder / f"{i:03d}.jpg").convert("RGB")))
        predictor.caption_ids(predictor.encode(arrays[:1]))  # warm-up

        model_only = _model_only(predictor, arrays, args.batch_size)

        settings = Settings(data_dir=Path(tmp) / "data", short_side=args.short_side)
        upgrade(settings.sqlalchemy_url)
        services = Services(settings)
        services.__dict__["predictor"] = predictor  # the same model object, no checkpoint file needed
        dim = model.config.dim_proj
        services.__dict__["model"] = ModelInfo(
            _register(services, dim), args.config, 2 * dim, dim)
        start = time.perf_counter()
        report = IngestPipeline(services, "bench", batch_size=args.batch_size).run(folder_items(folder))
        end_to_end = time.perf_counter() - start
        assert len(report.added) == args.images, report.failed
        video = _video_row(services, predictor, Path(tmp), args) if args.video_frames else None
        services.close()
    n = args.images
    print(f"\ningest, X-Decoder {args.config} (random weights), {n} JPEGs 640x480 -> short side {args.short_side}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'path':<34}{'seconds':>10}{'images/s':>10}")
    print(f"{'model only (decoded in memory)':<34}{model_only:>10.1f}{n / model_only:>10.3f}")
    print(f"{'end to end (files -> SQL + FAISS)':<34}{end_to_end:>10.1f}{n / end_to_end:>10.3f}")
    print(f"end to end runs at {model_only / end_to_end:.0%} of the model-only rate")
    if video is not None:
        frames, video_model, video_end = video
        print(f"\nvideo: one H.264 640x480 25 fps, {frames} frames sampled at {args.video_fps:g} fps")
        print(f"{'path':<34}{'seconds':>10}{'frames/s':>10}")
        print(f"{'model only (frames in memory)':<34}{video_model:>10.1f}{frames / video_model:>10.3f}")
        print(f"{'end to end (file -> SQL + FAISS)':<34}{video_end:>10.1f}{frames / video_end:>10.3f}")
        print(f"end to end runs at {video_model / video_end:.0%} of the model-only rate")


def _model_only(predictor: Predictor, arrays: list[np.ndarray], batch_size: int) -> float:
    timings = []
    for _ in range(2):  # the faster of two passes: no first-batch effects
        start = time.perf_counter()
        for b in range(0, len(arrays), batch_size):
            features = predictor.encode(arrays[b:b + batch_size])
            predictor.image_embeddings(features)
            predictor.region_embeddings(features)
            predictor.caption(features)
        timings.append(time.perf_counter() - start)
    return min(timings)


def _write_video(path: Path, seconds: float) -> None:
    import av

    w, h, fps = 640, 480, 25
    y, x = np.mgrid[0:h, 0:w]
    background = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for n in range(int(seconds * fps)):
            pixels = background.copy()
            cx, cy = int(80 + n * 4) % (w - 120), int(200 + 80 * np.sin(n / 10))
            pixels[cy:cy + 100, cx:cx + 100] = (210, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _video_row(services: Services, predictor: Predictor, tmp: Path, args: argparse.Namespace
               ) -> tuple[int, float, float]:
    """(frames, model-only seconds, end-to-end seconds) for one generated video."""
    from xdlabel.sources import Item
    from xdlabel.video import Sampling, VideoLimits, open_video, sample_frames
    from xdlabel.video_ingest import VideoPipeline

    path = tmp / "clip.mp4"
    _write_video(path, args.video_frames / args.video_fps)
    sampling = Sampling(fps=args.video_fps)
    with path.open("rb") as f:
        container, stream, info = open_video(f, VideoLimits())
        with container:
            frames = [fr.rgb for fr in sample_frames(container, stream, info, sampling, VideoLimits())]
    model_only = _model_only(predictor, frames, args.batch_size)
    start = time.perf_counter()
    report = VideoPipeline(services, "bench-video", sampling=sampling, batch_size=args.batch_size).run(
        [Item(path.resolve().as_uri())])
    end_to_end = time.perf_counter() - start
    assert len(report.added) == len(frames), report.failed
    return len(frames), model_only, end_to_end


def _register(services: Services, dim: int) -> int:
    from index.repository import get_or_create_model_version

    with services.sessions() as session:
        version = get_or_create_model_version(session, name="bench", checkpoint_sha256="0" * 64,
                                              embedding_dim=dim)
        session.commit()
        return version.id


if __name__ == "__main__":
    main()
