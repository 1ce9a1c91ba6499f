"""One module per command group; each lists its click commands in ``COMMANDS``."""
