"""``python -m raftsync ...`` is the ``raftsync`` command (for environments without the script)."""

from .cli import main

main(prog_name="raftsync")
