"""`xdlabel prelabel --project P` on a video project (its config has a <Video>): the command's video
branch, so one command pre-labels image and video projects alike."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from xdlabel.commands.common import emit

if TYPE_CHECKING:  # the CLI imports this module for every command: nothing heavy at import time
    from annotator.project import PrelabelOptions
    from xdlabel.settings import Settings


def video_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("video projects")
    group.add_argument("--video-fps", type=float, default=2.0,
                       help="video tasks: frames sampled per second for detection and keyframes (default 2)")
    group.add_argument("--video-every-n", type=int, help="video tasks: every n-th decoded frame instead of --video-fps")


def prelabel_video_command(args: argparse.Namespace, settings: Settings, client: Any,
                           options: PrelabelOptions) -> int | None:
    """None when the project is not a video project (the image path goes on), else the exit code."""
    from annotator.project import describe
    from annotator.video_project import VideoOptions, prelabel_video_project, video_project_config
    from xdlabel.video import Sampling, VideoLimits

    config = video_project_config(client, args.project, options)
    if config is None:
        return None
    every_n = getattr(args, "video_every_n", None)
    sampling = Sampling(every_n=every_n) if every_n else Sampling(fps=getattr(args, "video_fps", 2.0))
    video = VideoOptions(sampling=sampling, mode="instance" if options.task == "auto" else options.task,
                         limits=VideoLimits(settings.max_image_pixels, settings.max_video_seconds,
                                            settings.max_video_frames),
                         max_video_bytes=settings.max_video_bytes)
    from index.db import upgrade
    from xdlabel.services import Services

    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    try:
        # The model loads only once there is work to do.
        report = prelabel_video_project(lambda: services.predictor, client, services.sessions, args.project,
                                        services.model_version_name, options, video)
    finally:
        services.close()
    summary = describe(report)
    emit({k: v for k, v in summary.items() if k not in ("labels",)}, args.json)
    for task_id, reason in report.failed.items():
        print(f"task {task_id} failed: {reason}", file=sys.stderr)
    if report.delivery.error:
        print(f"error: {report.delivery.error}", file=sys.stderr)
    return 2 if report.delivery.auth_error else 0 if report.delivery.pending == 0 else 3
