"""Raw text-based person search datasets -> WebDataset tar shards (+ manifest.json).

Nothing in this package imports torch: it only reads annotations and images and writes tar shards through fsspec.
"""

__version__ = "0.1.0"
