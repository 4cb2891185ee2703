"""The ``xdlabel`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _model_info(args: argparse.Namespace) -> int:
    from xdecoder import CheckpointError, build_model, load_checkpoint
    from xdecoder.config import get_config

    cfg = get_config(args.config)
    info: dict[str, object] = {"config": cfg.name, "backbone": type(cfg.backbone).__name__,
                               "num_queries": cfg.decoder.num_queries, "dim_proj": cfg.dim_proj}
    if args.checkpoint:
        model = build_model(cfg)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        try:
            loaded = load_checkpoint(model, args.checkpoint)
        except (CheckpointError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        info.update(checkpoint=str(loaded.path), sha256=loaded.sha256, tensors=loaded.num_tensors,
                    ignored_keys=list(loaded.ignored))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>14}: {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xdlabel.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdlabel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect X-Decoder configs and checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="describe a config; with --checkpoint, load it strictly")
    info.add_argument("--config", default="focalt", help="focalt, focall, davitd3, davitd5, parity")
    info.add_argument("--checkpoint", help="local .pt/.safetensors path or hf://owner/repo/file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_model_info)

    demo = sub.add_parser("demo", help="run the main job on embedded defaults")
    demo.add_argument("--out", default="xdlabel-data/demo", help="output folder")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
