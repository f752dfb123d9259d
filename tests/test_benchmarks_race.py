"""The race benchmark's quick mode runs end to end on a tiny model, so the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick(script: str, tmp_path: Path, name: str, *extra: str) -> dict:
    """Run a benchmark script's quick mode into tmp_path; its JSON result."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out-dir", str(tmp_path),
                           *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_race_bench_quick_mode_writes_the_side_by_side_table(tmp_path):
    result = quick("race_bench.py", tmp_path, "race-tiny-llama-quick")
    rows = result["rows"]
    assert {(r["n"], r["variant"]) for r in rows} == {(n, v) for n in (1, 2) for v in ("off", "sets", "units")}
    for r in rows:
        assert len(r["removed"]) == r["n"] and r["test_ppl"] > 1.0 and r["seconds"] > 0
        assert r["sets_scored"] >= 1 and r["prune_over_analysis"] > 0
        assert r["stopped"] in ("budget", "converged") and 1 <= r["winner_at_set"] <= r["sets_scored"]
        assert (r["winner_at_units"] is None) == (r["variant"] == "off")
        assert r["variant"] == "off" or 0 < r["winner_at_units"] <= r["units"]
        # where the race dropped its sets: at its looks, as many as it dropped
        assert sum(r["drops_at"].values()) == r["dropped"] and set(r["drops_at"]) <= {str(m) for m in r["looks"] or []}
        # the progress named a best set so far before the search ended, and the final answer no later than the end
        assert 0 < r["first_answer_s"] <= r["final_answer_s"] <= r["seconds"]
    assert result["analysis_seconds"] > 0 and result["eval"]["dense_ppl"] > 1.0
    # the one-shot answers on the same capture, each with its test perplexity, and the memory used
    shots = result["one_shot"]
    assert {(o["n"], o["method"]) for o in shots} == {(n, m) for n in (1, 2) for m in ("shortgpt", "angular", "one-pass")}
    for o in shots:
        assert len(o["removed"]) == o["n"] and o["test_ppl"] > 1.0
    one_pass = {o["n"]: o["removed"] for o in shots if o["method"] == "one-pass"}
    assert all(r["one_pass_removed"] == one_pass[r["n"]] for r in rows)
    assert result["peak_rss_mb"] >= result["peak_rss_mb_after_analysis"] > 50
    md = (tmp_path / "race-tiny-llama-quick.md").read_text()
    races, shots_md = md.split("The one-shot answers")
    lines = [line.split(" | ")[:2] for line in races.splitlines() if line.startswith(("| 1 ", "| 2 "))]
    assert sorted(lines) == sorted([f"| {n}", v] for n in (1, 2) for v in ("off", "sets", "units"))
    assert sum(line.startswith(("| 1 ", "| 2 ")) for line in shots_md.splitlines()) == len(shots)
    assert "Peak resident memory" in shots_md


def test_batch_rows_quick_mode_times_every_batch_size(tmp_path):
    result = quick("batch_rows.py", tmp_path, "batch-rows-tiny-llama")
    assert [r["rows_per_call"] for r in result["rows"]] == [2, 8]
    assert all(r["seconds"] > 0 and r["us_per_unit"] > 0 for r in result["rows"]) and result["rows"][0]["relative"] == 1


def test_race_looks_quick_mode_replays_each_schedule_and_order_against_the_unraced_search(tmp_path):
    result = quick("race_looks.py", tmp_path, "race-looks-tiny-llama-quick")
    rows = result["rows"]
    variants = [(None, None)] + [(s, o) for s in ("doubling", "every") for o in ("field", "sequence")]
    assert [(r["n"], r.get("schedule"), r.get("order")) for r in rows] == [(n, *v) for n in (1, 2) for v in variants]
    for r in rows:
        assert len(r["removed"]) == r["n"] and r["sets_scored"] >= 1 and r["units"] > 0
        if r["variant"] == "off":
            assert r["units_over_off"] == 1.0 and r["dropped"] == 0 and r["seconds"] > 0
            continue
        # 16 samples in groups of 4: the doubling schedule looks at 4 and 8, every group's at 4, 8, 12
        assert r["looks"] == ([4, 8] if r["schedule"] == "doubling" else [4, 8, 12])
        assert 0 < r["units_over_off"] <= 1.0 and r["dropped"] == sum(r["drops_at"].values())
        # the best cases on the same sets: the floor (first looks only) below the oracle, the oracle at most all
        assert 0 < r["floor_over_off"] <= r["oracle_over_off"] <= 1.0
        if r["same_as_off"] and r["sets_scored"] == rows[0 if r["n"] == 1 else 5]["sets_scored"]:
            assert r["floor_over_off"] <= r["units_over_off"]
        assert set(r["drops_at"]) <= {str(m) for m in r["looks"]}
    md = (tmp_path / "race-looks-tiny-llama-quick.md").read_text()
    assert sum(line.startswith(("| 1 ", "| 2 ")) for line in md.splitlines()) == len(rows)
    # a typo is refused before the model loads
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "race_looks.py"), "--schedules", "halving",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--schedules takes doubling, every" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "race_looks.py"), "--orders", "fields",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--orders takes field, sequence" in bad.stderr


def test_race_bench_without_a_selection_prints_no_empty_table(tmp_path):
    result = quick("race_bench.py", tmp_path, "bare", "--variants", "", "--baselines", "", "--name", "bare")
    assert result["rows"] == [] and result["eval"]["dense_ppl"] > 1.0
    md = (tmp_path / "bare.md").read_text()
    assert "No verified selection was run" in md and "| n | variant |" not in md


def test_confirm_cost_quick_mode_scores_draw_b_both_ways_for_the_same_numbers(tmp_path):
    result = quick("confirm_cost.py", tmp_path, "confirm-cost-tiny-llama-quick")
    rescored = [r for r in result["rows"] if r["rescored"]]
    assert [r["n"] for r in result["rows"]] == [1, 2] and rescored
    for r in rescored:
        # the script itself fails when the two ways' NLLs differ or are not the search's
        assert len(r["nll_b"]) == len(r["rescored"])
        # before: a dense pass through every block and the head, then each finalist from the embeddings
        assert r["before"]["dense_units"] == 8 * 32 * (result["n_blocks"] + 1)
        assert r["after"]["dense_units"] < r["before"]["dense_units"]
        assert r["after"]["set_units"] <= r["before"]["set_units"] and r["units_after_over_before"] < 1
