from .diffusion import DiffusionModel, MissingCheckpointError, ModelSpec

__all__ = ["DiffusionModel", "MissingCheckpointError", "ModelSpec"]
