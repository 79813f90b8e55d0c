"""The operation kinds: one module per kind, built on the moves in ``moves`` and the
base in ``base``; ``runner`` holds the one table of kinds and runs them."""
