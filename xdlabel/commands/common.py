"""What every command shares: settings, a migrated database, printing results."""

from __future__ import annotations

import argparse
import json


def emit(values: dict[str, object], as_json: bool) -> None:
    """A result as JSON for scripts, or aligned key: value lines for people."""
    if as_json:
        print(json.dumps(values, indent=2, default=str))
    else:
        for key, value in values.items():
            print(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")


def settings_of(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The settings: XDLABEL_* variables over the --config-file."""
    from xdlabel.settings import load_settings

    return load_settings(args.config_file)


def migrated(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The settings, with the database brought to the current schema (a fresh data folder works)."""
    from index.db import upgrade

    settings = settings_of(args)
    upgrade(settings.sqlalchemy_url)
    return settings
