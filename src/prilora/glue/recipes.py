"""Per-task training recipes, one table per model family.

``deberta-v3-base``: the paper's GPU setting (AdaLoRA's GLUE recipes, batch 32, AdamW; see
docs/RECIPES.md for sources). ``minilm-cpu``: our own recipes for the packaged
all-MiniLM-L6-v2 on a 2-core CPU, chosen so that each of RTE, MRPC, STS-B and CoLA trains in
minutes (how they were chosen: docs/RECIPES.md); ``mpnet-cpu``: the same for the 12-layer
all-mpnet-base-v2. Every field can be overridden by a flag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Recipe:
    learning_rate: float  # adapter methods (prilora, lora, adalora); per method where ADAPTER_RATES says
    full_learning_rate: float  # full fine-tuning
    epochs: float
    max_seq_length: int
    warmup: float  # optimizer steps if >= 1, else a fraction of all steps
    weight_decay: float
    cls_dropout: float  # dropout before the classifier
    lora_alpha: float
    batch_size: int = 32
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **changes) -> "Recipe":
        """A copy with the given values (None: keep), checked: one line names a bad value."""
        recipe = replace(self, **{k: v for k, v in changes.items() if v is not None})
        checks = [("learning_rate", recipe.learning_rate > 0, "> 0"),
                  ("full_learning_rate", recipe.full_learning_rate > 0, "> 0"),
                  ("epochs", recipe.epochs > 0, "> 0"), ("batch_size", recipe.batch_size >= 1, ">= 1"),
                  ("max_seq_length", recipe.max_seq_length >= 8, ">= 8"), ("warmup", recipe.warmup >= 0, ">= 0"),
                  ("weight_decay", recipe.weight_decay >= 0, ">= 0"),
                  ("cls_dropout", 0 <= recipe.cls_dropout < 1, "in [0, 1)"), ("lora_alpha", recipe.lora_alpha > 0, "> 0"),
                  ("max_train_samples", recipe.max_train_samples is None or recipe.max_train_samples >= 1, ">= 1"),
                  ("max_eval_samples", recipe.max_eval_samples is None or recipe.max_eval_samples >= 1, ">= 1")]
        for name, ok, rule in checks:
            if not ok:
                flag = "--" + ("learning_rate" if name == "full_learning_rate" else name).replace("_", "-")
                raise ValueError(f"{flag} must be {rule}, got {getattr(recipe, name)}")
        return recipe


def _deberta(lr, epochs, max_len, warmup, wd, drop, alpha):
    return Recipe(lr, 2e-5, epochs, max_len, warmup, wd, drop, alpha)


RECIPES: dict[str, dict[str, Recipe]] = {
    "deberta-v3-base": {
        "mnli": _deberta(5e-4, 7, 256, 1000, 0.0, 0.15, 16),
        "sst2": _deberta(8e-4, 24, 128, 1000, 0.01, 0.0, 16),
        "cola": _deberta(5e-4, 25, 64, 100, 0.0, 0.10, 32),
        "qqp": _deberta(5e-4, 5, 320, 2000, 0.01, 0.15, 16),
        "qnli": _deberta(1.2e-3, 5, 512, 500, 0.01, 0.1, 32),
        "rte": _deberta(1.2e-3, 50, 320, 200, 0.01, 0.20, 32),
        "mrpc": _deberta(1e-3, 30, 320, 0.1, 0.01, 0.0, 32),
        "stsb": _deberta(2.2e-3, 25, 128, 100, 0.1, 0.2, 32),
    },
    "minilm-cpu": {
        "rte": Recipe(1e-3, 1e-4, 5, 128, 0.06, 0.01, 0.1, 16),
        "mrpc": Recipe(5e-4, 1e-4, 3, 128, 0.06, 0.01, 0.1, 16),
        "stsb": Recipe(1e-3, 1e-4, 3, 128, 0.06, 0.01, 0.1, 16),
        "cola": Recipe(5e-4, 1e-4, 3, 64, 0.06, 0.01, 0.1, 16),
        "sst2": Recipe(1e-3, 1e-4, 1, 64, 0.06, 0.01, 0.1, 16),
        "qnli": Recipe(1e-3, 1e-4, 1, 128, 0.06, 0.01, 0.1, 16, max_train_samples=20000),
        "qqp": Recipe(1e-3, 1e-4, 1, 128, 0.06, 0.01, 0.1, 16, max_train_samples=20000, max_eval_samples=5000),
        "mnli": Recipe(1e-3, 1e-4, 1, 128, 0.06, 0.01, 0.1, 16, max_train_samples=20000),
    },
}


# Each adapter method's own learning rate where the study chose one per method: the best mean score on
# held-out training examples of each method's grid in results/main-table.jsonl (MRPC, CoLA, STS-B, RTE)
# and results/sst2-subset.jsonl (SST-2, on its 8,000-example subset); tests/test_recipes.py recomputes
# them from those files. The tasks the study did not grid follow a rule: LoRA and PRILoRA keep the
# table's rate, AdaLoRA takes 8e-3, the median of its five choices (it chose 2e-3 to 1.6e-2, 4 to 32
# times LoRA's rate: at the shared 1e-3 it did not learn in a check on a task outside the study).
ADAPTER_RATES: dict[str, dict[str, dict[str, float]]] = {
    "minilm-cpu": {
        "rte": {"prilora": 5e-4, "lora": 5e-4, "adalora": 8e-3},
        "mrpc": {"prilora": 1e-3, "lora": 5e-4, "adalora": 1.6e-2},
        "stsb": {"prilora": 1e-3, "lora": 1e-3, "adalora": 8e-3},
        "cola": {"prilora": 5e-4, "lora": 5e-4, "adalora": 4e-3},
        "sst2": {"prilora": 1e-3, "lora": 2e-3, "adalora": 2e-3},
        "qnli": {"adalora": 8e-3},
        "qqp": {"adalora": 8e-3},
        "mnli": {"adalora": 8e-3},
    },
}
GRIDDED = {"minilm-cpu": ("rte", "mrpc", "stsb", "cola", "sst2")}  # chosen by the study, not by the rule


# all-mpnet-base-v2 (12 layers) on the same CPU: minilm-cpu's epochs, lengths and regularization, so
# that depth is the one thing that changes between the two studies; the study at depth 12
# (experiments/depth12.toml) chooses each method's rate on held-out training examples.
RECIPES["mpnet-cpu"] = dict(RECIPES["minilm-cpu"])


def recipe_family(model_id: str) -> str:
    """The recipe table for a model id or folder: DeBERTa models get the paper's, MPNet and others ours."""
    name = model_id.lower()
    if "deberta" in name:
        return "deberta-v3-base"
    return "mpnet-cpu" if "mpnet" in name else "minilm-cpu"


def get_recipe(family: str, task: str, method: str | None = None) -> Recipe:
    """The task's recipe; with ``method``, its ``learning_rate`` is that method's own where the family has
    one (``ADAPTER_RATES``), else the table's."""
    if family not in RECIPES:
        raise ValueError(f"unknown recipe {family!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[family][task]
    rate = ADAPTER_RATES.get(family, {}).get(task, {}).get(method)
    return replace(recipe, learning_rate=rate) if rate is not None else recipe


def adapter_rates_markdown(family: str) -> str:
    """The per-method learning-rate rows of docs/RECIPES.md (a test keeps the docs equal to them)."""
    rows = []
    for task in RECIPES[family]:
        rates = [get_recipe(family, task, m).learning_rate for m in ("prilora", "lora", "adalora")]
        source = "chosen by the study (held-out grid)" if task in GRIDDED.get(family, ()) else "rule (not gridded)"
        rows.append(f"| {task} | " + " | ".join(f"{r:g}" for r in rates) + f" | {source} |")
    return "\n".join(rows)


def recipes_markdown(family: str) -> str:
    """The rows of docs/RECIPES.md for one family (a test keeps the docs equal to this table)."""
    rows = []
    for task, r in RECIPES[family].items():
        rows.append(f"| {task} | {r.learning_rate:g} | {r.full_learning_rate:g} | {r.epochs:g} | {r.max_seq_length} | "
                    f"{r.warmup:g} | {r.weight_decay:g} | {r.cls_dropout:g} | {r.lora_alpha:g} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m prilora.glue.recipes: the tables of docs/RECIPES.md
    for name in RECIPES:
        print(f"{name}\n{recipes_markdown(name)}\n")
