"""One module per pipeline stage (each ends with its ``DECLARATION``); see registry.py."""
