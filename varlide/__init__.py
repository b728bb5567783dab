"""varlide: score, enhance and measure night-time image corpora.

The library knows nothing of Prefect (only ``varlide.cli`` imports flows, lazily).
"""

__version__ = "0.1.0"
