"""``python -m corral.cli``: how ``corral up`` starts server and agents with this interpreter."""

from corral.cli.main import main

main()
