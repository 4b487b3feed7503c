"""Network definitions, checkpoint loading, layer analysis and surgery (plain nn.Modules)."""
from models.registry import SHORT_NAMES, NetworkSpec, build_model

__all__ = ["SHORT_NAMES", "NetworkSpec", "build_model"]
