"""PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation, on top of PEFT LoRA."""

__version__ = "0.1.0"

from .config import PriLoraConfig  # noqa: E402
from .model import get_prilora_model, parameter_counts, prilora_summary  # noqa: E402
from .pruning import PriLoraPruner  # noqa: E402
from .ranks import rank_schedule  # noqa: E402


def __getattr__(name):
    # The Trainer callback imports transformers' Trainer stack; load it only when asked for.
    if name == "PriLoraCallback":
        from .callback import PriLoraCallback

        return PriLoraCallback
    raise AttributeError(f"module 'prilora' has no attribute {name!r}")


__all__ = [
    "PriLoraConfig",
    "PriLoraCallback",
    "PriLoraPruner",
    "get_prilora_model",
    "parameter_counts",
    "prilora_summary",
    "rank_schedule",
]
