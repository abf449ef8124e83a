"""PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation, on top of PEFT LoRA."""

__version__ = "0.1.0"

from .callback import PriLoraCallback, SaveOnInterrupt  # noqa: E402
from .config import PriLoraConfig  # noqa: E402
from .model import get_prilora_model, parameter_counts, prilora_summary  # noqa: E402
from .pruning import PriLoraPruner  # noqa: E402
from .ranks import rank_schedule  # noqa: E402

__all__ = [
    "PriLoraConfig",
    "PriLoraCallback",
    "SaveOnInterrupt",
    "PriLoraPruner",
    "get_prilora_model",
    "parameter_counts",
    "prilora_summary",
    "rank_schedule",
]
