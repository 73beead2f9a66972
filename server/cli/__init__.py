"""The ``tensorgate`` command: one module per subcommand, gathered here under ``main``.

The subcommand modules import nothing from this one, so each can be read (and imported)
on its own; frameworks and the server are imported inside the commands that need them.
"""

from __future__ import annotations

import click

from .bench import bench
from .convert import convert
from .demo import demo
from .health import health
from .infer import infer
from .options import PORT_FILE_ENV
from .rollout import rollout
from .routes import routes
from .serve import serve
from .top import top

__all__ = ["PORT_FILE_ENV", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tensorgate")
def main() -> None:
    """tensorgate: one Open Inference Protocol gRPC gateway for TorchScript, SavedModel and ONNX."""


for command in (serve, demo, infer, top, health, routes, rollout, bench, convert):
    main.add_command(command)
