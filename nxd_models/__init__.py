"""nxd_models: ready-made tensor parallel models that load Hugging Face checkpoints."""

from .handles import ParallelModel
from .loading import from_pretrained_parallel
from .registry import list_models

__all__ = ["ParallelModel", "from_pretrained_parallel", "list_models"]
