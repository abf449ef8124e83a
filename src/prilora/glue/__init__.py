"""GLUE: tasks, data (TSV or hub), metrics, recipes and the runner behind ``prilora train``."""

from .data import GlueDataError, Split, load_split
from .metrics import glue_metrics
from .recipes import RECIPES, Recipe, get_recipe
from .runner import METHODS, RunError, RunPaths, RunSpec, run_glue
from .tasks import TASKS, Task, get_task

__all__ = ["GlueDataError", "METHODS", "RECIPES", "Recipe", "RunError", "RunPaths", "RunSpec", "Split", "TASKS",
           "Task", "get_recipe", "get_task", "glue_metrics", "load_split", "run_glue"]
