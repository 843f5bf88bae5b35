"""``python -m riffusion.cli``: the same as the ``riffusion`` command."""

from riffusion.cli import main

main()
