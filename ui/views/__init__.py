"""One module per page; each exposes ``TITLE`` and ``render(cat)``."""

from __future__ import annotations
