"""prunebench: what visual-token pruning really does to a vision-language model."""

from __future__ import annotations

__version__ = "0.1.0"
