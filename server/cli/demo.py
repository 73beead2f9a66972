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
    write_demo(directory)
    for p in sorted(directory.rglob("*")):
        if p.is_file() and "variables" not in p.parts and p.name != ".complete":
            click.echo(p.relative_to(directory))


def write_demo(directory: Path) -> None:
    """Write the demo repository, or say what is wrong with ``directory``."""
    from ..demo import write_demo_repository

    try:
        write_demo_repository(directory)
    except OSError as e:  # the message says what is wrong with DIRECTORY
        raise click.ClickException(e.strerror or str(e)) from None
