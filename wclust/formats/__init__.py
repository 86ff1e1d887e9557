"""File formats: the .wclust safetensors file (no pickle anywhere)."""

from .wclust_file import FORMAT_VERSION, FormatError, load, read_header, save, stored_bytes

__all__ = ["FORMAT_VERSION", "FormatError", "load", "read_header", "save", "stored_bytes"]
