"""The ``medlake`` command line: thin wrappers that parse, call one function, render."""
