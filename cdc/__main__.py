"""``python -m cdc`` is the ``cdc`` command."""

from cdc.ops.cli import main

main()
