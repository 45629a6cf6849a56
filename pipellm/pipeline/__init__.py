"""The transfer pipeline: regions, modes (plain, cc) and their engines."""

from .pipeline import DEFAULT_BOUNCE_BYTES, DEFAULT_CHUNK_SIZE, MODES, Pipeline
from .region import Region
from .transfer import Transfer

__all__ = ["DEFAULT_BOUNCE_BYTES", "DEFAULT_CHUNK_SIZE", "MODES", "Pipeline", "Region", "Transfer"]
