"""The docs name only commands and raw files that exist, and every experiment is named in them.

A figure in docs/ is only as checkable as the command and the raw file named with it: a script that was
removed or renamed, or a results file cited by a wrong name, leaves a reader nothing to rerun.
"""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
PATH = re.compile(r"(?<![\w/.-])((?:experiments|results)/[\w./{},-]+)")


def named_paths(doc: str) -> list[str]:
    """Every experiments/... and results/... path the document names, braces expanded
    (``results/bench-{before,after}.json`` is two files); patterns with ``*`` and folders left out."""
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    out = []
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".,")
        if path.endswith("/") or "*" in text[match.end():match.end() + 1]:
            continue
        brace = re.search(r"\{([^}]*)\}", path)
        out += [path[:brace.start()] + x + path[brace.end():] for x in brace.group(1).split(",")] if brace else [path]
    return out


def spec_outputs() -> set[str]:
    """The results file each sweep spec writes, whether or not it has run yet (it is named before it exists)."""
    outputs = set()
    for spec in glob.glob(os.path.join(ROOT, "experiments", "*.toml")):
        with open(spec) as f:
            text = f.read()
        output = re.search(r'^output\s*=\s*"([^"]+)"', text, re.M)
        name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)
        outputs.add(output.group(1) if output else f"results/{name}.jsonl")
    return outputs


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_command_and_raw_file_exists(doc):
    planned = spec_outputs()
    missing = [p for p in named_paths(doc)
               if not (os.path.exists(os.path.join(ROOT, p)) or p in planned
                       # images and tables that the report writes beside docs/RESULTS.md
                       or os.path.exists(os.path.join(ROOT, os.path.dirname(doc), p)))]
    assert missing == []


def test_every_experiment_is_named_in_the_docs():
    named = {p for doc in DOCS for p in named_paths(doc)}
    files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "experiments", "*"))
                   if not p.endswith(".md"))
    assert [f for f in files if f not in named] == []


def test_the_check_sees_what_docs_name():
    """The path pattern finds what a doc names (so the tests above cannot pass by finding nothing)."""
    assert "experiments/main-table.toml" in named_paths("docs/SWEEPS.md")
    assert {"results/bench-minilm-b32-l128-norms-before.json",
            "results/bench-minilm-b32-l128-norms-after.json"} <= set(named_paths("docs/DEFAULTS.md"))
    assert not os.path.exists(os.path.join(ROOT, "experiments", "overhead_check.py"))
