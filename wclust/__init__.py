"""wclust: compress neural networks by weight clustering.

Light to import: torch and numpy only; transformers, numba and the measurement
code are imported where they are used.
"""

from .api import model_nbytes, strip
from .config import ClusterConfig, ConfigError
from .core import ClusteredTensor, cluster_tensor
from .formats import FormatError, load, read_header, save
from .formats.checkpoint import CheckpointError
from .integrations import install_transformers_hook
from .recipes import Recipe, compress_, get_recipe
from .report.layers import CompressionReport, LayerReport
from .stages.prune import prune_, remove_masks_
from .stages.train import distill_, finetune, freeze_codebooks_, split_holdout, trainable_codebooks_
from .stream import compress_checkpoint

__version__ = "0.1.0"

# transformers finds the wclust quantizer (from_pretrained of a saved folder) once it
# loads its quantizer table; nothing of transformers is imported here.
install_transformers_hook()


def __getattr__(name: str):
    if name == "WclustConfig":  # imports transformers: only when asked for
        from .integrations.transformers import WclustConfig

        return WclustConfig
    raise AttributeError(f"module 'wclust' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ClusterConfig",
    "ClusteredTensor",
    "CompressionReport",
    "ConfigError",
    "FormatError",
    "LayerReport",
    "Recipe",
    "WclustConfig",
    "__version__",
    "cluster_tensor",
    "compress_checkpoint",
    "compress_",
    "distill_",
    "finetune",
    "freeze_codebooks_",
    "get_recipe",
    "load",
    "model_nbytes",
    "prune_",
    "read_header",
    "remove_masks_",
    "save",
    "split_holdout",
    "strip",
    "trainable_codebooks_",
]
