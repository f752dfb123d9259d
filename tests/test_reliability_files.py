"""Reliability round 2: never destroy a user's files, never accept nonsense silently, no internal
errors. Each harmful case of the issue is shown fixed where the user meets it (mostly the CLI),
then a property-based test damages saved analyses and exported models at random, and the
remaining tests cover the malformed inputs, odd paths, special files, devices and extreme values
found while hunting internal errors. Rows of docs/RELIABILITY.md cite these tests as `F::test`.

CLI contract: a problem the user can fix exits with status 2 and one stderr line
`mi-prun: error: ...`; status 1 (`internal error`) is a bug and must never happen here.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import assert_one_line_error, run_cli
from mi_prun.config import AnalysisConfig
from mi_prun.errors import MiPrunError
from mi_prun.evaluate import perplexity
from mi_prun.runtime import load_model
from mi_prun.results import Analysis
from mi_prun.select import select
from mi_prun.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--samples", "8", "--tokens", "48"]
EVAL_TEXT = "text:" + "The quick brown fox jumps over the lazy dog. " * 20


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def tree_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below `folder` (folders as 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def save_tiny(folder: Path, family: str = "llama", n_layers: int = 3) -> Path:
    model, tok = tiny_model(family, n_layers=n_layers)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (3 blocks): a model folder like any other (copy it before damaging it)."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama-3")


@pytest.fixture(scope="module")
def llama_analysis(tmp_path_factory) -> Path:
    """The analysis of the zoo model tiny-llama (6 blocks), saved by the CLI."""
    folder = tmp_path_factory.mktemp("analyses") / "llama"
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--out", str(folder))
    assert rc == 0, err
    return folder


@pytest.fixture(scope="module")
def model_dir_analysis(tmp_path_factory, model_dir) -> Path:
    folder = tmp_path_factory.mktemp("analyses") / "llama3"
    rc, _, err = run_cli("analyze", "--model", str(model_dir), *SMALL, "--out", str(folder))
    assert rc == 0, err
    return folder


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, model_dir, model_dir_analysis) -> Path:
    """A pruned export of `model_dir` (1 of 3 blocks removed)."""
    folder = tmp_path_factory.mktemp("exports") / "pruned"
    rc, _, err = run_cli("prune", "--model", str(model_dir), "--analysis", str(model_dir_analysis),
                         "--n", "1", "--no-protect-ends", "--out", str(folder))
    assert rc == 0, err
    return folder


# ---------------------------------------------------------------------------------------------
# (a) --overwrite never destroys a user's files


def test_prune_out_dot_overwrite_refuses_and_deletes_nothing(tmp_path, monkeypatch, llama_analysis):
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes\n")
    (work / "data" / "table.csv").write_text("a,b\n1,2\n")
    before = tree_digest(work)
    monkeypatch.chdir(work)
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(llama_analysis), "--n", "1",
                             "--out", ".", *extra)
        assert_one_line_error(rc, err, "Fix:")
        assert tree_digest(work) == before
    # a sibling folder holding user files: refused as no earlier export, nothing deleted
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(llama_analysis), "--n", "1",
                         "--out", "data", "--overwrite")
    assert_one_line_error(rc, err, "not an earlier mi-prun pruned model")
    assert tree_digest(work) == before


def test_overwrite_names_foreign_files_in_an_earlier_export(tmp_path, export_dir):
    out = shutil.copytree(export_dir, tmp_path / "exp")
    (out / "my_results.txt").write_text("keep me")
    before = tree_digest(out)
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--n", "1", *SMALL, "--calib", EVAL_TEXT,
                         "--out", str(out), "--overwrite")
    assert_one_line_error(rc, err, "my_results.txt", "did not write")
    assert tree_digest(out) == before


def test_out_equal_to_the_model_is_refused_and_the_model_kept(tmp_path, model_dir, model_dir_analysis,
                                                             monkeypatch):
    m = shutil.copytree(model_dir, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    before = tree_digest(m)
    rc, _, err = run_cli("prune", "--model", "./m", "--analysis", str(model_dir_analysis), "--n", "1",
                         "--out", "./m", "--overwrite")
    assert_one_line_error(rc, err, "is the input", "Fix:")
    rc, _, err = run_cli("analyze", "--model", "./m", *SMALL, "--out", "./m", "--overwrite")
    assert_one_line_error(rc, err, "is the input")
    rc, _, err = run_cli("analyze", "--model", "m/", *SMALL, "--out", str(tmp_path / "m"), "--overwrite")
    assert_one_line_error(rc, err, "is the input")
    assert tree_digest(m) == before
    assert load_model(Path("m")).n_blocks == 3


def test_out_equal_to_a_model_that_is_an_earlier_export_is_refused(tmp_path, export_dir):
    """The dangerous case: the model is itself a mi-prun export, so its marker would allow
    --overwrite; the input check refuses it anyway."""
    m = shutil.copytree(export_dir, tmp_path / "exp")
    before = tree_digest(m)
    rc, _, err = run_cli("prune", "--model", str(m), "--n", "1", "--no-protect-ends", *SMALL,
                         "--calib", EVAL_TEXT, "--out", str(m), "--overwrite")
    assert_one_line_error(rc, err, "is the input")
    assert tree_digest(m) == before


def test_out_that_contains_the_input_is_refused(tmp_path, model_dir, model_dir_analysis, monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(model_dir, models / "m")
    an = shutil.copytree(model_dir_analysis, tmp_path / "runs" / "an")
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tmp_path)
    rc, _, err = run_cli("prune", "--model", "models/m", "--analysis", str(an), "--n", "1",
                         "--out", "models", "--overwrite")
    assert_one_line_error(rc, err, "contains the input")
    rc, _, err = run_cli("prune", "--model", "models/m", "--analysis", "runs/an", "--n", "1",
                         "--out", "runs/", "--overwrite")
    assert_one_line_error(rc, err, "contains the input")
    rc, _, err = run_cli("analyze", "--model", "models/m", *SMALL, "--out", str(models), "--overwrite")
    assert_one_line_error(rc, err, "contains the input")
    rc, _, err = run_cli("analyze", "--model", "models/m", *SMALL, "--out", "..", "--overwrite")
    assert_one_line_error(rc, err, "contains")
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# (b) two processes saving the same analysis folder

WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from mi_prun.errors import MiPrunError
    from mi_prun.results import Analysis

    src, base, me, other, rounds, overwrite = sys.argv[1:7]
    base, rounds, overwrite = Path(base), int(rounds), overwrite == "1"
    sync = base / "sync"
    analysis = Analysis.load(src)
    results = []
    for r in range(rounds):
        (sync / f"{r}-{me}").touch()
        deadline = time.monotonic() + 60
        while not (sync / f"{r}-{other}").exists() and time.monotonic() < deadline:
            time.sleep(0.0002)
        target = base / ("shared" if overwrite else f"round-{r}")
        try:
            analysis.save(target, overwrite=overwrite)
            results.append("ok")
        except MiPrunError:
            results.append("MiPrunError")
        except BaseException as exc:
            results.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps(results))
""")


def _race(tmp_path: Path, src: Path, rounds: int, overwrite: bool) -> tuple[list[str], list[str]]:
    base = tmp_path / ("ow" if overwrite else "new")
    (base / "sync").mkdir(parents=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(src), str(base), me, other, str(rounds),
                               "1" if overwrite else "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path)
             for me, other in (("a", "b"), ("b", "a"))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return json.loads(outs[0][0]), json.loads(outs[1][0])


def test_two_processes_saving_the_same_new_folder_exactly_one_wins(tmp_path, llama_analysis):
    rounds = 30
    a, b = _race(tmp_path, llama_analysis, rounds, overwrite=False)
    expected = Analysis.load(llama_analysis)
    base = tmp_path / "new"
    for r in range(rounds):
        assert sorted((a[r], b[r])) == ["MiPrunError", "ok"], (r, a[r], b[r])
        got = Analysis.load(base / f"round-{r}")  # complete and valid
        np.testing.assert_array_equal(got.span, expected.span)
        assert sorted(p.name for p in (base / f"round-{r}").iterdir()) == ["analysis.json", "arrays.npz"]
    assert not [p.name for p in base.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_two_processes_overwriting_the_same_folder_never_crash(tmp_path, llama_analysis):
    a, b = _race(tmp_path, llama_analysis, 30, overwrite=True)
    assert set(a + b) <= {"ok", "MiPrunError"}, set(a + b)
    assert "ok" in a + b
    got = Analysis.load(tmp_path / "ow" / "shared")
    np.testing.assert_array_equal(got.block_mi, Analysis.load(llama_analysis).block_mi)
    assert not [p.name for p in (tmp_path / "ow").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# (c) damaged arrays are refused by name


def _damage_arrays(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    with np.load(dst / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    change(arrays)
    np.savez(dst / "arrays.npz", **arrays)
    return dst


def _set(name, i, j, value):
    def change(arrays):
        arrays[name][i, j] = value
        arrays[name][j, i] = value
    return change


ARRAY_DAMAGE = {
    "block_mi-nan": ("block_mi", lambda a: a["block_mi"].__setitem__(2, np.nan)),
    "block_mi-inf": ("block_mi", lambda a: a["block_mi"].__setitem__(0, np.inf)),
    "span-nan": ("span", _set("span", 0, 4, np.nan)),
    "span-inf": ("span", _set("span", 1, 5, np.inf)),
    "span-negative": ("span", _set("span", 0, 5, -3.0)),
    "span-asymmetric": ("span", lambda a: a["span"].__setitem__((0, 4), a["span"][0, 4] + 1.0)),
    "span-wrong-shape": ("span", lambda a: a.__setitem__("span", a["span"][:-1, :-1])),
    "span-1d": ("span", lambda a: a.__setitem__("span", a["span"].ravel())),
    "span-strings": ("span", lambda a: a.__setitem__("span", a["span"].astype(str))),
    "block_mi-disagrees": ("block_mi", lambda a: a["block_mi"].__setitem__(1, a["block_mi"][1] + 5.0)),
    "span_norm-above-1": ("span_norm", _set("span_norm", 0, 3, 7.0)),
    "batches-inf": ("block_mi_batches", lambda a: a["block_mi_batches"].__setitem__((0, 0), np.inf)),
    "cosine_bi-negative": ("baseline.cosine_bi", lambda a: a["baseline.cosine_bi"].__setitem__(0, -1.0)),
    "angular-nan": ("baseline.angular", _set("baseline.angular", 0, 2, np.nan)),
}


@pytest.mark.parametrize("case", sorted(ARRAY_DAMAGE))
def test_damaged_arrays_are_refused_with_their_name(tmp_path, llama_analysis, case):
    name, change = ARRAY_DAMAGE[case]
    folder = _damage_arrays(llama_analysis, tmp_path / "an", change)
    with pytest.raises(MiPrunError, match=f"array '{name}'"):
        Analysis.load(folder)
    for argv in (["select", str(folder), "--n", "1"], ["show", str(folder)]):
        rc, _, err = run_cli(*argv)
        assert_one_line_error(rc, err, f"array '{name}'", "Fix:")


# ---------------------------------------------------------------------------------------------
# (d) an analysis of one model is not applied to another


def test_analysis_of_another_model_is_refused_unless_forced(tmp_path, llama_analysis):
    for other in ("tiny-gpt2", "tiny-qwen2"):  # both have 6 blocks, like tiny-llama
        rc, _, err = run_cli("prune", "--model", other, "--analysis", str(llama_analysis), "--n", "1",
                             "--out", str(tmp_path / f"x-{other}"))
        assert_one_line_error(rc, err, "another model", "--force")
        assert not (tmp_path / f"x-{other}").exists()
    rc, out, err = run_cli("prune", "--model", "tiny-qwen2", "--analysis", str(llama_analysis), "--n", "1",
                           "--out", str(tmp_path / "forced"), "--force")
    assert rc == 0, err
    assert load_model(tmp_path / "forced").n_blocks == 5
    # a selection file carries the identity too
    sel = tmp_path / "sel.json"
    rc, _, err = run_cli("select", str(llama_analysis), "--n", "1", "--out", str(sel))
    assert rc == 0, err
    rc, _, err = run_cli("prune", "--model", "tiny-gpt2", "--selection", str(sel), "--out", str(tmp_path / "y"))
    assert_one_line_error(rc, err, "another model")


def test_force_never_accepts_another_block_count(tmp_path, llama_analysis, model_dir):
    rc, _, err = run_cli("prune", "--model", str(model_dir), "--analysis", str(llama_analysis), "--n", "1",
                         "--out", str(tmp_path / "x"), "--force")
    assert_one_line_error(rc, err, "for a model of 6 blocks; this one has 3")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# (e) too few positions for the estimator


@pytest.mark.parametrize("argv", [["--samples", "8", "--tokens", "48", "--positions", "1"],
                                  ["--samples", "8", "--tokens", "48", "--positions", "2"],
                                  ["--samples", "1", "--tokens", "2"]])
def test_too_few_positions_name_the_minimum(argv):
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *argv)
    assert_one_line_error(rc, err, "needs at least 3", "--positions")


def test_noisy_estimate_is_noted_in_the_analysis(tmp_path):
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", "--samples", "2", "--tokens", "8",
                         "--out", str(tmp_path / "an"))
    assert rc == 0, err
    notes = Analysis.load(tmp_path / "an").notes
    assert notes and any("position" in n for n in notes), notes


# ---------------------------------------------------------------------------------------------
# (f) a hand-edited config does not load with random weights


def test_raised_num_hidden_layers_is_refused(tmp_path, model_dir):
    m = shutil.copytree(model_dir, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (m / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli("eval", "--model", str(m), "--data", EVAL_TEXT, "--seq-len", "32")
    assert_one_line_error(rc, err, "says 5 blocks but its weights hold 3", "Fix:")


# ---------------------------------------------------------------------------------------------
# (g) library calls with wrong types


def test_library_types(model_dir, llama_analysis):
    loaded = load_model(Path(model_dir))
    assert loaded.n_blocks == 3
    analysis = Analysis.load(llama_analysis)
    bad = [lambda: select(analysis, seed=-1), lambda: select(analysis, max_iter="x"),
           lambda: select(analysis, n=2.0), lambda: select(None), lambda: select(str(llama_analysis)),
           lambda: perplexity(loaded.model, loaded.tokenizer, EVAL_TEXT, seq_len=2.5),
           lambda: perplexity(loaded.model, loaded.tokenizer, EVAL_TEXT, seq_len=16, add_bos="yes"),
           lambda: AnalysisConfig(estimator_options=None), lambda: AnalysisConfig(dpi_tol=float("nan")),
           lambda: AnalysisConfig(n_samples=2.0), lambda: AnalysisConfig(seed=True),
           lambda: load_model(None), lambda: load_model(3), lambda: load_model(""),
           lambda: load_model("tiny-llama", device=None), lambda: Analysis.load(3)]
    for i, call in enumerate(bad):
        with pytest.raises(MiPrunError):
            call()
            pytest.fail(f"case {i} accepted")
    assert AnalysisConfig(n_samples=np.int64(2)).n_samples == 2
    assert type(AnalysisConfig(n_samples=np.int64(2)).n_samples) is int
    assert select(analysis, n=np.int64(1)).n == 1


# ---------------------------------------------------------------------------------------------
# property-based: damaged analysis folders and exported models


def _flip_bytes(data: bytes, positions: list[int]) -> bytes:
    b = bytearray(data)
    for p in positions:
        if b:
            b[p % len(b)] ^= 0xFF
    return bytes(b)


@st.composite
def analysis_damage(draw):
    kind = draw(st.sampled_from(["cell", "shape", "dtype", "flip", "truncate", "json-del", "json-type",
                                 "json-value", "delete-file", "harmless"]))
    return kind, draw(st.randoms(use_true_random=False))


def _apply_analysis_damage(folder: Path, kind: str, rnd) -> None:
    npz, meta_path = folder / "arrays.npz", folder / "analysis.json"
    if kind in ("cell", "shape", "dtype"):
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k].copy() for k in f.files}
        name = rnd.choice(sorted(arrays))
        arr = arrays[name]
        if kind == "cell":
            idx = tuple(rnd.randrange(s) for s in arr.shape)
            arr = arr.astype(np.float64)
            arr[idx] = rnd.choice([np.nan, np.inf, -np.inf, -1.0, 1e300, -1e-3])
        elif kind == "shape":
            arr = arr[: max(0, arr.shape[0] - rnd.randint(1, 3))]
        else:
            arr = arr.astype(rnd.choice([np.int8, np.float16, np.complex64, np.bool_, str]))
        arrays[name] = arr
        np.savez(npz, **arrays)
    elif kind == "flip":
        data = npz.read_bytes()
        npz.write_bytes(_flip_bytes(data, [rnd.randrange(len(data)) for _ in range(rnd.randint(1, 8))]))
    elif kind == "truncate":
        target = rnd.choice([npz, meta_path])
        data = target.read_bytes()
        target.write_bytes(data[: rnd.randrange(len(data))])
    elif kind.startswith("json"):
        meta = json.loads(meta_path.read_text())
        key = rnd.choice(sorted(meta))
        if kind == "json-del":
            del meta[key]
        elif kind == "json-type":
            meta[key] = rnd.choice([None, 3, "x", [], {}, 1.5, True])
        else:  # replace a nested value
            value = meta[key]
            if isinstance(value, dict) and value:
                value[rnd.choice(sorted(value))] = rnd.choice([None, -1, "x", [1], {"a": None}, 1e308])
            else:
                meta[key] = rnd.choice([None, -1, "", [None], {"a": 1}])
        meta_path.write_text(json.dumps(meta))
    elif kind == "delete-file":
        rnd.choice([npz, meta_path]).unlink()
    # "harmless": nothing changes (the result must then be the same as before)


@pytest.fixture(scope="module")
def reference_selection(llama_analysis) -> str:
    rc, out, err = run_cli("select", str(llama_analysis), "--n", "2")
    assert rc == 0, err
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(damage=analysis_damage())
def test_fuzz_damaged_analysis_folders(tmp_path_factory, llama_analysis, reference_selection, damage):
    kind, rnd = damage
    folder = shutil.copytree(llama_analysis, tmp_path_factory.mktemp("fuzz") / "an")
    _apply_analysis_damage(folder, kind, rnd)
    for argv in (["show", str(folder)], ["select", str(folder), "--n", "2"]):
        rc, out, err = run_cli(*argv)
        assert rc in (0, 2), (kind, rc, err)
        assert "Traceback" not in err and "internal error" not in err, err
        if rc == 2:
            assert_one_line_error(rc, err)
        elif argv[0] == "select":  # accepted: the scores it selects from must be the saved ones
            got, ref = Analysis.load(folder), Analysis.load(llama_analysis)
            same = all(np.array_equal(np.asarray(getattr(got, k), dtype=np.float64),
                                      np.asarray(getattr(ref, k), dtype=np.float64), equal_nan=True)
                       for k in ("block_mi", "span", "span_norm"))
            assert same or kind in ("cell", "dtype"), kind  # a valid-looking edit of the numbers
            if same:  # the same blocks (the first line; later lines hold timings)
                assert out.splitlines()[0] == reference_selection.splitlines()[0], kind


@st.composite
def model_damage(draw):
    kind = draw(st.sampled_from(["config-del", "config-type", "config-layers", "config-garbage",
                                 "weights-truncate", "weights-flip", "delete", "marker", "harmless"]))
    return kind, draw(st.randoms(use_true_random=False))


def _apply_model_damage(folder: Path, kind: str, rnd) -> None:
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if kind.startswith("config-") and kind != "config-garbage":
        cfg = json.loads(cfg_path.read_text())
        if kind == "config-del":
            del cfg[rnd.choice(sorted(cfg))]
        elif kind == "config-type":
            cfg[rnd.choice(sorted(cfg))] = rnd.choice([None, "x", -1, [], {}, 1e9, True])
        else:
            cfg["num_hidden_layers"] = rnd.choice([0, 1, 3, 7, -2, "two", None])
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "config-garbage":
        cfg_path.write_bytes(rnd.randbytes(rnd.randint(0, 200)))
    elif kind == "weights-truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: rnd.randrange(len(data))])
    elif kind == "weights-flip":
        data = weights.read_bytes()
        header = int.from_bytes(data[:8], "little") + 8  # flip inside the header: the damage is seen
        weights.write_bytes(_flip_bytes(data, [rnd.randrange(header) for _ in range(rnd.randint(1, 4))]))
    elif kind == "delete":
        rnd.choice(sorted(p for p in folder.iterdir() if p.is_file())).unlink()
    elif kind == "marker":
        (folder / "mi_prun.json").write_text(rnd.choice(["", "{", "[]", '{"format": 3}', "null"]))


@pytest.mark.parametrize("key,value", [("hidden_act", "x"), ("dtype", []), ("vocab_size", -1)])
def test_config_that_cannot_build_the_model_is_a_clear_error(tmp_path, export_dir, key, value):
    """Found by the fuzz test below: config.json parses, but a field's value breaks building the
    model (an unknown activation, a dtype of the wrong type, a negative vocabulary size)."""
    folder = shutil.copytree(export_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli("eval", "--model", str(folder), "--data", EVAL_TEXT, "--seq-len", "32", "--max-windows", "2")
    assert_one_line_error(rc, err, "config.json is damaged")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(damage=model_damage())
def test_fuzz_damaged_exported_models(tmp_path_factory, export_dir, damage):
    kind, rnd = damage
    folder = shutil.copytree(export_dir, tmp_path_factory.mktemp("fuzzm") / "m")
    _apply_model_damage(folder, kind, rnd)
    rc, out, err = run_cli("eval", "--model", str(folder), "--data", EVAL_TEXT, "--seq-len", "32",
                           "--max-windows", "2")
    assert rc in (0, 2), (kind, rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if rc == 2:
        assert_one_line_error(rc, err)
    else:
        assert out.startswith("perplexity ")
        if kind == "harmless":
            assert load_model(folder).n_blocks == 2


# ---------------------------------------------------------------------------------------------
# hunting: malformed text files, odd paths, special files, unreadable files


@pytest.mark.parametrize("content, suffix, fragment", [
    (b"\x00\x01\xfe\xff" * 300, ".bin", "looks binary"),
    (bytes(range(128, 256)) * 10, ".txt", "not valid UTF-8"),
    (b"", ".jsonl", "empty or only whitespace"),
    (b"1\n2\n", ".jsonl", "line 1 has no string field"),
    (b'{"text": "a"}\n[1, 2\n', ".jsonl", "line 2 is not JSON"),
])
def test_malformed_calibration_files(tmp_path, content, suffix, fragment):
    path = tmp_path / f"calib{suffix}"
    path.write_bytes(content)
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--calib", str(path))
    assert_one_line_error(rc, err, fragment)


def test_folder_without_text_and_unicode_paths(tmp_path, monkeypatch):
    (tmp_path / "empty dir").mkdir()
    (tmp_path / "empty dir" / "data.csv").write_text("a,b")
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--calib", str(tmp_path / "empty dir") + "/")
    assert_one_line_error(rc, err, "holds no .txt, .md or .jsonl files")
    # a file name with spaces and non-ASCII letters, reached through ~ and saved into a unicode folder
    home = tmp_path / "home"
    home.mkdir()
    (home / "mes données é.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--calib", "~/mes données é.txt",
                         "--out", "résultat ü/")
    assert rc == 0, err
    assert Analysis.load(tmp_path / "résultat ü").calibration["source"].endswith("mes données é.txt")
    rc, out, err = run_cli("show", "résultat ü/")
    assert rc == 0, err
    rc, out, err = run_cli("eval", "--model", "tiny-llama", "--data", "~/mes données é.txt", "--seq-len", "32",
                           "--max-windows", "1")
    assert rc == 0, err


@pytest.mark.parametrize("special", ["/dev/null", "/dev/zero", "fifo"])
def test_special_files_as_text_are_refused_without_reading(tmp_path, special):
    if special == "fifo":
        special = str(tmp_path / "pipe.txt")
        os.mkfifo(special)  # nobody writes to it: opening it would block forever
    for argv in (["analyze", "--model", "tiny-llama", *SMALL, "--calib", special],
                 ["eval", "--model", "tiny-llama", "--data", special]):
        rc, _, err = run_cli(*argv)
        assert_one_line_error(rc, err, "not a regular file", "Fix:")


def test_special_files_as_analysis_selection_and_out(tmp_path):
    rc, _, err = run_cli("show", "/dev/null")
    assert_one_line_error(rc, err, "is not a saved analysis")
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--selection", "/dev/null", "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err)
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--out", "/dev/null")
    assert_one_line_error(rc, err, "is a file, not a folder")


def test_growing_file_read_is_capped(tmp_path, monkeypatch):
    """The size check happens on stat; a file that grows after it is still read only up to the
    limit (one byte past it), never without bound."""
    import mi_prun.data as data_mod

    path = tmp_path / "big.txt"
    path.write_text("x" * 5000)
    monkeypatch.setattr(data_mod, "MAX_TEXT_BYTES", 10_000)
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, *a, **k: os.stat_result((0o100644,) + (0,) * 9)
                        if self == path else real_stat(self, *a, **k))
    with open(path, "a") as fh:
        fh.write("y" * 20_000)
    with pytest.raises(MiPrunError, match="larger than the limit"):
        data_mod.load_text(str(path))


def _deny(monkeypatch, fragment: str) -> None:
    """Simulate chmod 000 on files whose path contains `fragment` (the tests run as root)."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if fragment in str(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


@pytest.mark.parametrize("what", ["calib", "analysis.json", "arrays.npz", "config.json", "tokenizer"])
def test_unreadable_files_are_one_line(tmp_path, monkeypatch, what, llama_analysis, model_dir):
    calib = tmp_path / "secret.txt"
    calib.write_text("The quick brown fox. " * 100)
    if what == "calib":
        argv = ["analyze", "--model", "tiny-llama", *SMALL, "--calib", str(calib)]
        fragment = "secret.txt"
    elif what in ("analysis.json", "arrays.npz"):
        argv = ["show", str(llama_analysis)]
        fragment = f"{llama_analysis.name}/{what}"
    else:
        argv = ["eval", "--model", str(model_dir), "--data", EVAL_TEXT, "--seq-len", "32"]
        fragment = f"{model_dir.name}/{what}"
    _deny(monkeypatch, fragment)
    rc, _, err = run_cli(*argv)
    assert_one_line_error(rc, err, "ermission denied")


def test_broken_pipe_exits_quietly(llama_analysis):
    """`mi-prun show x | head -1`: the reader leaves early; no traceback, no error, status 0."""
    cli = f"{sys.executable} -c 'import sys; from mi_prun.cli import main; sys.exit(main())'"
    for args, reader in ((f"show {llama_analysis}", "head -1"), (f"select {llama_analysis} --compare", "head -1"),
                         (f"show {llama_analysis}", "head -c 0"), ("estimators", "true")):
        proc = subprocess.run(["bash", "-c", f"{cli} {args} | {reader}; exit ${{PIPESTATUS[0]}}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, (args, reader, proc.stderr)
        assert proc.stderr == "", (args, reader, proc.stderr)
        assert len(proc.stdout.splitlines()) == (1 if reader == "head -1" else 0)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_output_device_is_a_one_line_error(llama_analysis):
    """`mi-prun show x > /dev/full`: the output cannot be written; one line, status 2, no traceback."""
    cli = f"{sys.executable} -c 'import sys; from mi_prun.cli import main; sys.exit(main())'"
    proc = subprocess.run(["bash", "-c", f"{cli} show {llama_analysis} > /dev/full"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("mi-prun: error: cannot write the output: No space left")
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# hunting: devices, dtypes and extreme option values


@pytest.mark.parametrize("argv, fragment", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "cuda:7"], "CUDA is not available"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "mps"], "MPS (Apple GPU) is not available"),
    (["--device", "meta"], "is not supported"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--dtype", "int8"], "unknown dtype"),
])
def test_unusual_devices_and_dtypes(argv, fragment):
    import torch

    if torch.cuda.is_available() and "CUDA" in fragment:
        pytest.skip("this machine has CUDA")
    if torch.backends.mps.is_available() and "MPS" in fragment:
        pytest.skip("this machine has MPS")
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, *argv)
    assert_one_line_error(rc, err, fragment)


def test_device_map_naming_a_missing_device(model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run_cli("eval", "--model", str(model_dir), "--device-map", "cuda", "--data", EVAL_TEXT)
    assert_one_line_error(rc, err, "CUDA is not available")
    rc, _, err = run_cli("eval", "--model", str(model_dir), "--device-map", "nonsense", "--data", EVAL_TEXT)
    assert_one_line_error(rc, err)


@pytest.mark.parametrize("argv, fragment", [
    (["--samples", str(10**9), "--tokens", "48"], "not enough calibration text"),
    (["--samples", "8", "--tokens", str(10**7)], "exceed the context"),
    (["--samples", "8", "--tokens", "48", "--seed", "-1"], "seed must be at least 0"),
    (["--samples", "8", "--tokens", "48", "--seed", str(2**64)], "seed must be at most"),
    (["--samples", "8", "--tokens", "48", "--estimator-options", '{"k": 1000000000000000}'], "has no option 'k'"),
    (["--samples", "8", "--tokens", "48", "--estimator", "ksg", "--estimator-options",
      '{"k_neighbors": 1000000000000000}'], "k_neighbors"),
    (["--samples", "8", "--tokens", "48", "--estimator", "binning", "--estimator-options",
      '{"bins": 1000000000000000}'], "out of range"),
    (["--samples", "8", "--tokens", "48", "--estimator-options", "[1]"], "must be a JSON object"),
])
def test_extreme_values_are_refused(argv, fragment):
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *argv)
    assert_one_line_error(rc, err, fragment)


@pytest.mark.parametrize("argv", [
    ["--positions", str(10**12)], ["--batch-size", str(10**9)],
    ["--estimator", "ksg", "--estimator-options", '{"k": 1000000000000000, "max_samples": 1000000000000000}'],
    ["--estimator", "gaussian-joint", "--estimator-options", '{"k": 1000000000000000}'],
])
def test_extreme_values_that_are_bounds_work(argv):
    """Limits that are caps, not requests: more positions than exist, a batch larger than the
    samples, more components than the width. They are clipped to what there is."""
    rc, out, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, *argv)
    assert rc == 0, err
    assert "block" in out


def test_extreme_eval_and_select_values(llama_analysis):
    rc, out, err = run_cli("eval", "--model", "tiny-llama", "--data", EVAL_TEXT, "--seq-len", "16",
                           "--max-windows", str(10**12), "--batch-size", str(10**9))
    assert rc == 0 and out.startswith("perplexity"), err
    rc, _, err = run_cli("select", str(llama_analysis), "--n", str(10**10))
    assert_one_line_error(rc, err, "would remove all 6 blocks")
    rc, _, err = run_cli("select", str(llama_analysis), "--ratio", "0.999999999")
    assert_one_line_error(rc, err, "remove at most 5")
