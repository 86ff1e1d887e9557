"""wclust: compress neural networks by weight clustering."""

__version__ = "0.1.0"
