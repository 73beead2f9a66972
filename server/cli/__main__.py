"""``python -m tensorgate.server.cli``: the same as the ``tensorgate`` command."""

from . import main

main()
