"""`python -m edgekit …`: what the systemd unit runs, so it needs no console script on PATH."""

from edgekit.cli import main

main()
