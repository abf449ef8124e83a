"""The recipe tables in the code and in docs/RECIPES.md are the same, and resolve as documented."""

from pathlib import Path

import pytest

from prilora.glue.recipes import (ADAPTER_RATES, GRIDDED, RECIPES, adapter_rates_markdown, get_recipe, recipe_family,
                                  recipes_markdown)
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


def test_docs_show_each_methods_rate():
    assert adapter_rates_markdown("minilm-cpu") in DOC.read_text()


def test_each_methods_rate_is_the_studys_choice_from_the_committed_grids():
    """Recomputed from the raw lines: per task and method, the rate of the held-out grid with the best mean
    score (ties: the first in the grid), as the sweep chose it for the study's dev runs."""
    import json
    from collections import defaultdict

    from prilora.study.sweep import select_values

    root = DOC.parents[1]
    grids = defaultdict(list)
    for name in ("main-table", "sst2-subset"):
        for text in (root / "results" / f"{name}.jsonl").read_text().splitlines():
            line = json.loads(text)
            if line["sweep"]["stage"] == "lr" and line["method"] != "full":
                grids[line["task"], line["sweep"]["variant"]].append(line)
    chosen = {key: select_values(lines, ["learning-rate"])[0]["learning-rate"] for key, lines in grids.items()}
    assert {task for task, _ in chosen} == set(GRIDDED["minilm-cpu"])
    for (task, method), rate in chosen.items():
        assert ADAPTER_RATES["minilm-cpu"][task][method] == rate, (task, method)
        assert get_recipe("minilm-cpu", task, method).learning_rate == rate
    # Not gridded: the stated rule (the table's rate; AdaLoRA the median of its choices).
    adalora = sorted(rate for (_, method), rate in chosen.items() if method == "adalora")
    for task in set(RECIPES["minilm-cpu"]) - set(GRIDDED["minilm-cpu"]):
        assert get_recipe("minilm-cpu", task, "adalora").learning_rate == adalora[len(adalora) // 2] == 8e-3
        for method in ("prilora", "lora", None):
            assert get_recipe("minilm-cpu", task, method).learning_rate == RECIPES["minilm-cpu"][task].learning_rate
    assert get_recipe("minilm-cpu", "mrpc", "full") == RECIPES["minilm-cpu"]["mrpc"]  # full keeps its own column
