"""Allow ``python -m bpstream``."""

from bpstream.cli import main

main()
