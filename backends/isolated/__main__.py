"""``python -m tensorgate.backends.isolated``: an isolated backend worker (``child.main``)."""

from .child import main

main()
