"""The recipe tables in the code and in docs/RECIPES.md are the same, and resolve as documented."""

from pathlib import Path

import pytest

from prilora.glue.recipes import RECIPES, get_recipe, recipe_family, recipes_markdown
from prilora.glue.tasks import TASKS

DOC = Path(__file__).resolve().parents[1] / "docs" / "RECIPES.md"


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_docs_show_the_code_table(family):
    assert set(RECIPES[family]) == set(TASKS)
    assert recipes_markdown(family) in DOC.read_text()


def test_family_and_overrides():
    assert recipe_family("microsoft/deberta-v3-base") == "deberta-v3-base"
    assert recipe_family("sentence-transformers/all-MiniLM-L6-v2") == "minilm-cpu"
    assert recipe_family("sentence-transformers/all-mpnet-base-v2") == "mpnet-cpu"
    rte = get_recipe("deberta-v3-base", "rte")
    assert (rte.learning_rate, rte.epochs, rte.max_seq_length, rte.warmup, rte.cls_dropout, rte.lora_alpha) == \
        (1.2e-3, 50, 320, 200, 0.2, 32)
    changed = rte.override(learning_rate=5e-4, epochs=None)
    assert changed.learning_rate == 5e-4 and changed.epochs == 50
    with pytest.raises(ValueError, match="unknown recipe .gpu.: choose one of deberta-v3-base, minilm-cpu, mpnet-cpu"):
        get_recipe("gpu", "rte")
