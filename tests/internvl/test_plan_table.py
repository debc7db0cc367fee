"""README.md's "Which GPUs for which size" table is what scripts/plan_table.py prints (`captune plan` for the seven
releases on 1 and 8 GPUs of 80 GB): a change to the plan or to a recipe that moves a figure fails here until the
README is regenerated (`python scripts/plan_table.py`, pasted over the old table)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_is_the_scripts_output():
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "scripts" / "plan_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table = script.table()
    assert table.count("\n| InternVL2-") == 7 and "InternVL2-Llama3-76B" in table
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert table in readme, "README.md's table is stale: run `python scripts/plan_table.py` and paste its output"
