"""The classic benchmark's checkpoint: every finished target is saved atomically and a rerun resumes from it."""

from __future__ import annotations

import json

import pytest

from atlasseg.benchmarks.classic import ROWS_FORMAT, markdown, run_suite
from atlasseg.phantom import make_phantom_atlas_set


@pytest.fixture(scope="module")
def eleven_phantoms(tmp_path_factory):
    # leave-one-out ("fetal" protocol) needs 10 atlases besides the target
    return make_phantom_atlas_set(tmp_path_factory.mktemp("bench") / "set", n_cases=11, seed=3, shape=(20, 24, 20))


def test_benchmark_resumes_from_saved_rows_of_the_same_commit(eleven_phantoms, tmp_path):
    rows_file = tmp_path / "rows.json"
    messages: list[str] = []
    first = run_suite(eleven_phantoms, "fetal", 1, ["torch"], False, "cpu", log=messages.append,
                      checkpoint=rows_file, commit="abc123")
    saved = json.loads(rows_file.read_text())
    assert saved["format"] == ROWS_FORMAT and saved["commit"] == "abc123" and len(saved["rows"]) == 1
    assert first["rows"][0]["methods"]["majority"]["dice"]

    second = run_suite(eleven_phantoms, "fetal", 2, ["torch"], False, "cpu", log=messages.append,
                       checkpoint=rows_file, commit="abc123")
    assert any("resuming after 1" in m for m in messages)
    assert [r["target"] for r in second["rows"]] == second["targets"][:2]
    assert second["rows"][0] == first["rows"][0]          # reused as saved, not recomputed
    assert len(json.loads(rows_file.read_text())["rows"]) == 2
    mean_dice_1 = sum(r["methods"]["majority"]["dice"][1] for r in second["rows"]) / 2
    assert f"{mean_dice_1:.4f}" in markdown(second, "atlasseg benchmark fetal", 1.0)  # resumed rows summarise

    messages.clear()
    third = run_suite(eleven_phantoms, "fetal", 1, ["torch"], False, "cpu", log=messages.append,
                      checkpoint=rows_file, commit="def456")
    assert any("starting again" in m for m in messages)
    assert third["rows"][0]["wall_s"] != first["rows"][0]["wall_s"]  # another commit's rows are recomputed


def test_a_foreign_checkpoint_is_refused_with_its_path(eleven_phantoms, tmp_path):
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps({"format": ROWS_FORMAT, "suite": "hippocampus", "commit": "x", "rows": []}))
    with pytest.raises(ValueError, match="rows.json: not a 'fetal' benchmark checkpoint"):
        run_suite(eleven_phantoms, "fetal", 1, ["torch"], False, "cpu", checkpoint=rows_file, commit="x")
    rows_file.write_text("{broken")
    with pytest.raises(ValueError, match="rows.json: unreadable benchmark checkpoint"):
        run_suite(eleven_phantoms, "fetal", 1, ["torch"], False, "cpu", checkpoint=rows_file, commit="x")
