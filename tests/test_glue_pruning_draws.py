"""evals/glue_pruning_draws.py lines up fine-tune draws: each pruned model against its own draw's dense parent."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from evals import glue_pruning_draws as draws  # noqa: E402


def _state(work, dense, pruned):
    state = {f"{work}/minilm-mrpc/dense:eval": {"accuracy": dense[0], "f1": dense[1], "num_examples": 408}}
    for name, (acc, f1) in pruned.items():
        state[f"{work}/minilm-mrpc/{name}:eval"] = {"accuracy": acc, "f1": f1, "num_examples": 408}
        state[f"{work}/minilm-mrpc/{name}:prune"] = {"heads": [1]}
    return state


def test_each_draw_is_compared_with_its_own_dense_parent(tmp_path):
    data = {"draws": {"A": _state("/tmp/a", (80.0, 86.0), {"fisher-masks-0.6": (70.0, 80.0), "fisher-weights-0.6": (79.0, 86.0)}),
                      "B": _state("/tmp/a", (76.0, 84.0), {"fisher-weights-0.6": (77.0, 84.0)})},
            "commands": {"A": ["python evals/glue_pruning.py --work /tmp/a  # a remark"]}, "notes": ["a note"]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    assert draws.main([str(path), "--out", str(tmp_path / "t")]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    by = {(r["draw"], m): d for r in rows for m, d in r["drop"].items()}
    assert by[("A", "fisher-masks")] == -8.0 and by[("A", "fisher-weights")] == -0.5 and by[("B", "fisher-weights")] == 0.5
    md = (tmp_path / "t.md").read_text()
    assert "| 0.6 | fisher-weights | 2 | -0.5 | 2 of 2 |" in md and "| 0.6 | fisher-masks | 1 | -8.0 | 0 of 1 |" in md
    assert "`python evals/glue_pruning.py --work /tmp/a` (a remark)" in md and "- a note" in md
