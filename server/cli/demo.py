"""``tensorgate demo``: write the demo model repository."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click


@click.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def demo(directory: Path) -> None:
    """Write the demo model repository to DIRECTORY (models are generated, not downloaded)."""
    logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ..demo import write_demo_repository

    write_demo_repository(directory)
    for p in sorted(directory.rglob("*")):
        if p.is_file() and "variables" not in p.parts and p.name != ".complete":
            click.echo(p.relative_to(directory))
