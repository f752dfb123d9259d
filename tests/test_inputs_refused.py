"""Bad inputs are refused in one line: no wrong answer with exit 0, no internal error, bounded memory
on any text (the classes of issue 23). Each class of the issue is shown fixed where the user meets it (CLI or library);
docs/RELIABILITY.md cites these tests as `R3::test`.

CLI contract: a problem the user can fix exits with status 2 and one stderr line
`mi-prun: error: ...`; status 1 (`internal error`) is a bug and must never happen here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli
from mi_prun.config import SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun.runtime import load_model
from mi_prun.results import Analysis
from mi_prun.select import Selection, select
from mi_prun.select.guided import guided_select
from mi_prun.select.verify import verified_select

SMALL = ["--samples", "8", "--tokens", "48"]


@pytest.fixture(scope="module")
def llama_analysis(tmp_path_factory) -> Path:
    """The analysis of the zoo model tiny-llama (6 blocks), saved by the CLI."""
    folder = tmp_path_factory.mktemp("analyses") / "llama"
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", *SMALL, "--out", str(folder))
    assert rc == 0, err
    return folder


def _without_identity(src: Path, dst: Path) -> Path:
    """A copy of a saved analysis as format 1 wrote it before identities existed."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "analysis.json").read_text())
    del meta["model"]["identity"]
    (dst / "analysis.json").write_text(json.dumps(meta))
    return dst


# ---------------------------------------------------------------------------------------------
# 1a/1b: an analysis or selection is never applied to another model


def test_analysis_without_identity_refuses_another_model(tmp_path, llama_analysis):
    old = _without_identity(llama_analysis, tmp_path / "old")
    for other in ("tiny-gpt2", "tiny-qwen2"):  # 6 blocks each, like tiny-llama
        rc, _, err = run_cli("prune", "--model", other, "--analysis", str(old), "--n", "1",
                             "--out", str(tmp_path / f"x-{other}"))
        assert_one_line_error(rc, err, "another model", "--force")
        assert not (tmp_path / f"x-{other}").exists()
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(old), "--n", "1",
                         "--out", str(tmp_path / "same"))
    assert rc == 0, err
    rc, _, err = run_cli("prune", "--model", "tiny-qwen2", "--analysis", str(old), "--n", "1",
                         "--out", str(tmp_path / "forced"), "--force")
    assert rc == 0, err
    # a selection written from such an analysis carries the same record
    sel = tmp_path / "sel.json"
    rc, _, err = run_cli("select", str(old), "--n", "1", "--out", str(sel))
    assert rc == 0, err
    rc, _, err = run_cli("prune", "--model", "tiny-gpt2", "--selection", str(sel), "--out", str(tmp_path / "y"))
    assert_one_line_error(rc, err, "another model")


def test_library_select_and_verified_select_refuse_another_model(llama_analysis, tmp_path):
    other = load_model("tiny-qwen2")
    analyses = [Analysis.load(llama_analysis),
                Analysis.load(_without_identity(llama_analysis, tmp_path / "old"))]
    cfg = SelectConfig(n=2, verify_passes=4)
    for analysis in analyses:
        with pytest.raises(MiPrunError, match="another model"):
            verified_select(other, analysis, cfg)
        with pytest.raises(MiPrunError, match="another model"):
            select(analysis, config=cfg, model=other)
        with pytest.raises(MiPrunError, match="another model"):  # a method that is not verified, too
            select(analysis, config=cfg.replace(method="random"), model=other)
        with pytest.raises(MiPrunError, match="another model"):
            guided_select(other, analysis, cfg)
        forced = select(analysis, config=cfg, model=other, force=True)
        assert forced.verified and len(forced.removed) == 2
    same = verified_select(load_model("tiny-llama"), analyses[0], cfg)
    assert same.verified


def test_selection_check_model_uses_the_same_rule(llama_analysis):
    sel = select(Analysis.load(llama_analysis), n=1)
    stripped = Selection.from_dict({**sel.to_dict(), "provenance": {"model": {
        k: v for k, v in sel.provenance["model"].items() if k != "identity"}}})
    for s in (sel, stripped):
        with pytest.raises(MiPrunError, match="another model"):
            s.check_model(load_model("tiny-gpt2"))
        s.check_model(load_model("tiny-llama"))


# ---------------------------------------------------------------------------------------------
# 1c: a calibration folder is read whole or not at all


def test_unlistable_subfolder_is_refused_not_skipped(tmp_path, monkeypatch):
    import os

    from mi_prun.data import load_text

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first part " * 50)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second part " * 50)
    whole = load_text(str(tmp_path))
    assert "first part" in whole.text and "second part" in whole.text
    real = os.scandir

    def scandir(path="."):  # the tests run as root, so chmod 000 would not stop them
        if Path(path) == tmp_path / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(MiPrunError, match=r"cannot read .*/b: Permission denied\. Fix: .*chmod"):
        load_text(str(tmp_path))
    rc, _, err = run_cli("analyze", "--model", "tiny-llama", "--calib", str(tmp_path), *SMALL)
    assert_one_line_error(rc, err, f"{tmp_path / 'b'}", "Fix:")


# ---------------------------------------------------------------------------------------------
# 1d: text in bounded memory


class _Recorder:
    """A tokenizer that records the length of every text it is given (ids: one per word)."""

    bos_token_id = None

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, text: str, **_):
        from types import SimpleNamespace

        self.calls.append(len(text))
        return SimpleNamespace(input_ids=[len(w) % 50 for w in text.split()])


def test_long_text_is_tokenised_in_bounded_pieces(monkeypatch):
    from mi_prun import data

    monkeypatch.setattr(data, "WHOLE_TOKENIZE_CHARS", 1000)
    monkeypatch.setattr(data, "TOKENIZE_PIECE_CHARS", 300)
    words = [f"w{i % 97}" + "x" * (i % 7) for i in range(3000)]
    text = "\n".join(" ".join(words[i:i + 11]) for i in range(0, len(words), 11))
    pieces = list(data.text_pieces(text, 300))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 300
    assert all(p[:1] in ("\n", " ") for p in pieces[1:])  # cut before a separator: no word is split
    tok = _Recorder()
    ids = data.tokenize(tok, text)
    assert max(tok.calls) <= 300 and len(tok.calls) == len(pieces)
    assert ids.tolist() == [len(w) % 50 for w in text.split()]  # the same ids as one call
    small = _Recorder()
    data.tokenize(small, text[:900])
    assert small.calls == [900]  # a text under the limit is one call, as every result so far


# ---------------------------------------------------------------------------------------------
# 2: deeply nested JSON, .json records


def test_deeply_nested_json_is_one_line_everywhere(tmp_path, llama_analysis):
    deep = "[" * 50_000 + "]" * 50_000
    shallow_but_deep = "[" * 100 + "]" * 100  # decodes, but deeper than any mi-prun file
    for payload in (deep, shallow_but_deep):
        an = tmp_path / f"an{len(payload)}"
        shutil.copytree(llama_analysis, an)
        (an / "analysis.json").write_text(payload)
        rc, _, err = run_cli("show", str(an))
        assert_one_line_error(rc, err, "analysis.json", "Fix:")
        sel = tmp_path / f"sel{len(payload)}.json"
        sel.write_text(payload)
        rc, _, err = run_cli("prune", "--model", "tiny-llama", "--selection", str(sel), "--out", str(tmp_path / "x"))
        assert_one_line_error(rc, err, "selection file", "Fix:")
        jl = tmp_path / f"deep{len(payload)}.jsonl"
        jl.write_text('{"text": "a"}\n' + payload + "\n")
        rc, _, err = run_cli("analyze", "--model", "tiny-llama", "--calib", str(jl), *SMALL)
        assert_one_line_error(rc, err, "line 2 is not JSON", "nested deeper")
        rc, _, err = run_cli("analyze", "--model", "tiny-llama", "--estimator-options", payload, *SMALL)
        assert rc == 2 and "Traceback" not in err


def test_json_calibration_file_is_read_as_records(tmp_path):
    from mi_prun.data import load_text

    records = [{"text": f"Record number {i} says something."} for i in range(5)]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(records))
    text = load_text(str(path))
    assert text.text == "\n\n".join(r["text"] for r in records) and "{" not in text.text
    path.write_text(json.dumps({"text": "one object"}))
    with pytest.raises(MiPrunError, match="not an array of records.*rename it to .txt"):
        load_text(str(path))
    path.write_text(json.dumps([{"body": "x"}]))
    with pytest.raises(MiPrunError, match="record 0 has no string field 'text'"):
        load_text(str(path))


# ---------------------------------------------------------------------------------------------
# 2: paths longer than the file system allows


def test_paths_too_long_are_one_line(tmp_path, llama_analysis):
    long_name = tmp_path / ("n" * 300)
    long_path = tmp_path / "/".join(["d" * 200] * 25)
    for path in (long_name, long_path):
        for argv in (["show", str(path)],
                     ["analyze", "--model", "tiny-llama", *SMALL, "--out", str(path)],
                     ["analyze", "--model", "tiny-llama", *SMALL, "--calib", str(path)],
                     ["select", str(llama_analysis), "--n", "1", "--out", str(path)],
                     ["eval", "--model", str(path)]):
            rc, _, err = run_cli(*argv)
            assert_one_line_error(rc, err, "Fix: use a shorter path.")


# ---------------------------------------------------------------------------------------------
# 2: SIGTERM during export leaves nothing behind

_SLOW_EXPORT = """
import sys, time
import mi_prun.files as files
real = files.fsync_tree
def slow(folder):  # the export's content is written; wait here so the test can send SIGTERM
    print("READY", flush=True)
    time.sleep(120)
    real(folder)
files.fsync_tree = slow
from mi_prun.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_export_removes_the_temporary_folder(tmp_path, llama_analysis):
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "slow_export.py"
    script.write_text(_SLOW_EXPORT)
    out = tmp_path / "exports" / "pruned"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), "--quiet", "prune", "--model", "tiny-llama",
                             "--analysis", str(llama_analysis), "--n", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == "READY":
                break
        hidden = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
        assert hidden, "the export should be writing into a hidden temporary folder now"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "mi-prun: terminated" in err, (proc.returncode, err)
    assert list(out.parent.iterdir()) == []  # neither the temporary folder nor a half export


# ---------------------------------------------------------------------------------------------
# 2: two writers with overwrite=True


def test_output_checks_run_under_the_writers_lock(tmp_path, monkeypatch, llama_analysis):
    """`check_output` (the pre-check of every save) reads the folder only under the lock the final
    rename holds, so a writer replacing it meanwhile is never seen half-done (this was a raw
    FileNotFoundError 1-2 times per 600 saves of two writers; the stress run is in RELIABILITY.md)."""
    import contextlib

    from mi_prun import files

    held: list[bool] = []
    state = {"locked": False}
    real_lock, real_check = files._parent_lock, files._check_output

    @contextlib.contextmanager
    def lock(parent):
        with real_lock(parent):
            state["locked"] = True
            try:
                yield
            finally:
                state["locked"] = False

    def check(*args, **kwargs):
        held.append(state["locked"])
        return real_check(*args, **kwargs)

    monkeypatch.setattr(files, "_parent_lock", lock)
    monkeypatch.setattr(files, "_check_output", check)
    analysis = Analysis.load(llama_analysis)
    analysis.save(tmp_path / "an")
    analysis.save(tmp_path / "an", overwrite=True)
    files.check_output(tmp_path / "new" / "deeper", files.ANALYSIS)
    assert held and all(held), held


# ---------------------------------------------------------------------------------------------
# 2: sequence lengths past the context, healing fits that cannot be solved


def test_verify_tokens_beyond_the_context_is_refused_like_analyze(tmp_path, llama_analysis):
    for model in ("tiny-llama", "tiny-gpt2"):  # Llama extrapolated silently, GPT-2 was an IndexError
        rc, _, err = run_cli("prune", "--model", model, *SMALL, "--n", "1", "--verify-tokens", "257",
                             "--out", str(tmp_path / model))
        assert_one_line_error(rc, err, "257 verification tokens per sample", "context", "at most 256")
        assert not (tmp_path / model).exists()
        rc, _, err = run_cli("analyze", "--model", model, "--samples", "2", "--tokens", "257")
        assert_one_line_error(rc, err, "257 tokens per sample exceed the context", "at most 256")
    rc, _, err = run_cli("select", str(llama_analysis), "--n", "1", "--model", "tiny-llama", "--verify-tokens", "300")
    assert_one_line_error(rc, err, "300 verification tokens per sample", "at most 256")


@pytest.mark.parametrize("flags, fragment", [
    (["--heal-ridge", "1e308"], "ridge (relative lambda) must be <= 1000000.0"),
    # 1 sample x 15 positions (16 tokens, the first dropped) for 32 channels (Llama folds have no bias)
    (["--heal-ridge", "0", "--heal-samples", "1"], "needs at least 32 calibration rows"),
])
def test_healing_fits_that_cannot_be_solved_are_refused(tmp_path, flags, fragment):
    out = tmp_path / "healed"
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--samples", "8", "--tokens", "16", "--n", "1",
                         "--heal", *flags, "--out", str(out))
    assert_one_line_error(rc, err, fragment, "Fix:" if "rows" in fragment else "")
    assert not out.exists()


def test_determined_ridge_zero_fit_still_heals(tmp_path, llama_analysis):
    """The rule is rows >= unknowns: with enough rows a ridge of 0 is an ordinary least squares fit."""
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(llama_analysis), "--n", "1",
                         "--heal", "--heal-ridge", "0", "--heal-samples", "4", "--out", str(tmp_path / "ok"))
    assert rc == 0, err


def test_configs_refuse_values_they_would_not_honour():
    from mi_prun.config import ExportConfig, HealConfig

    for bad in ("lots", "0GB", "2.5GB", "", True, -5):
        with pytest.raises(MiPrunError, match="max_shard_size must be a size"):
            ExportConfig(max_shard_size=bad)
    for good in ("5GB", "500MB", "2GiB", 10_000_000):
        ExportConfig(max_shard_size=good)
    for bad in (0.99, 0.6, 1.0, -0.1):
        with pytest.raises(MiPrunError, match="holdout fraction"):
            HealConfig(holdout=bad)
    HealConfig(holdout=0.5)
    for bad in (1e308, float("inf")):
        with pytest.raises(MiPrunError, match="ridge"):
            HealConfig(ridge=bad)


# ---------------------------------------------------------------------------------------------
# 2: the model cache


def test_unusable_model_cache_is_one_line(tmp_path, monkeypatch):
    import os

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MI_PRUN_CACHE", str(blocker / "cache"))
    with pytest.raises(MiPrunError, match="cache .* cannot be used.*Fix: set MI_PRUN_CACHE"):
        load_model("smollm2-135m")
    rc, _, err = run_cli("eval", "--model", "smollm2-135m")
    assert_one_line_error(rc, err, "MI_PRUN_CACHE")
    monkeypatch.setenv("MI_PRUN_CACHE", str(tmp_path / "read-only"))
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)  # root ignores chmod
    with pytest.raises(MiPrunError, match="Permission denied.*Fix: set MI_PRUN_CACHE"):
        load_model("smollm2-135m")


# ---------------------------------------------------------------------------------------------
# 2: selection files and format versions

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 9), st.floats(allow_nan=True),
                  st.text(max_size=4), st.lists(st.one_of(st.integers(-2, 8), st.floats(0, 8), st.booleans()),
                                                max_size=4))


@pytest.fixture(scope="module")
def selection_record(llama_analysis, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("sel") / "sel.json"
    select(Analysis.load(llama_analysis), n=2).save(path)
    return json.loads(path.read_text())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["removed", "kept", "runs", "n", "n_blocks", "format_version", "objective",
                            "seconds", "forward_passes", "method", "one_pass_removed"]), value=_JUNK)
def test_fuzz_selection_fields(tmp_path, selection_record, key, value):
    """A selection file with one field replaced loads exactly as written or is refused in one line:
    never rounded, cast or half-read (`removed: [2.7, 3.2]` used to load as [2, 3], `[true, 3]` as [1, 3])."""
    path = tmp_path / "sel.json"
    path.write_text(json.dumps({**selection_record, key: value}))
    try:
        sel = Selection.load(path)
    except MiPrunError as exc:
        assert "\n" not in str(exc) and "Fix:" in str(exc)
        return
    back = {**selection_record, key: value}
    assert list(sel.removed) == back["removed"] and sel.n == back["n"] and sel.n_blocks == back["n_blocks"]
    assert all(type(b) is int for b in sel.removed)


@pytest.mark.parametrize("removed", [[2.7, 3.2], [True, 3], ["2", 3]])
def test_selection_block_numbers_must_be_whole(tmp_path, selection_record, removed):
    path = tmp_path / "sel.json"
    path.write_text(json.dumps({**selection_record, "removed": removed}))
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--selection", str(path), "--out", str(tmp_path / "x"))
    assert_one_line_error(rc, err, "is not a whole number", "Fix:")


def test_format_versions_are_checked(tmp_path, selection_record, llama_analysis):
    path = tmp_path / "sel.json"
    for version in (2, "1", None):
        path.write_text(json.dumps({**selection_record, "format_version": version}))
        with pytest.raises(MiPrunError, match="format_version .* this mi-prun reads format_version 1"):
            Selection.load(path)
    an = tmp_path / "an"
    shutil.copytree(llama_analysis, an)
    meta = json.loads((an / "analysis.json").read_text())
    (an / "analysis.json").write_text(json.dumps({**meta, "format_version": "1"}))
    rc, _, err = run_cli("show", str(an))
    line = assert_one_line_error(rc, err, "format_version must be a whole number, got '1'", "Fix:")
    assert "reads format 1" not in line


# ---------------------------------------------------------------------------------------------
# 2: flags that would be ignored


@pytest.mark.parametrize("argv, fragment", [
    (["--verify-passes", "4"], "--verify-passes would be ignored"),
    (["--verify-tokens", "32"], "--verify-tokens would be ignored"),
    (["--compare", "--model", "tiny-llama"], "--model would be ignored: --compare"),
    (["--compare", "--method", "exact"], "--method would be ignored: --compare"),
    (["--method", "random", "--model", "tiny-llama"], "--model would be ignored: method random"),
    (["--dtype", "float32"], "--dtype would be ignored: no --model"),
])
def test_select_refuses_flags_it_would_ignore(llama_analysis, argv, fragment):
    rc, _, err = run_cli("select", str(llama_analysis), "--n", "1", *argv)
    assert_one_line_error(rc, err, fragment, "Fix: drop")


def test_prune_refuses_verification_flags_of_an_unverified_method(tmp_path, llama_analysis):
    rc, _, err = run_cli("prune", "--model", "tiny-llama", "--analysis", str(llama_analysis), "--n", "1",
                         "--method", "shortgpt", "--verify-passes", "8", "--out", str(tmp_path / "x"))
    assert_one_line_error(rc, err, "--verify-passes would be ignored: method shortgpt is not verified")


# ---------------------------------------------------------------------------------------------
# 2: eval on a damaged sharded checkpoint or tokenizer


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    from mi_prun.testing import tiny_model

    folder = tmp_path_factory.mktemp("sharded") / "model"
    model, tok = tiny_model("llama", n_layers=2)
    model.save_pretrained(folder, max_shard_size="20KB")
    tok.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


_DAMAGE = {
    "index-not-json": (lambda d: (d / "model.safetensors.index.json").write_text("{garbage"),
                       "model.safetensors.index.json cannot be read"),
    "index-a-list": (lambda d: (d / "model.safetensors.index.json").write_text("[1, 2]"), "no valid 'weight_map'"),
    "index-missing-shard": (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "nope.safetensors"}})),
        "names shard(s) that are not there: nope.safetensors"),
    "tokenizer-gone": (lambda d: [p.unlink() for p in d.glob("tokenizer*")], "holds no tokenizer file"),
    "tokenizer-broken": (lambda d: (d / "tokenizer.json").write_text("{broken"), "one of them is damaged"),
}


@pytest.mark.parametrize("case", sorted(_DAMAGE))
def test_eval_on_damaged_checkpoint_names_the_file(tmp_path, sharded_dir, case):
    damage, fragment = _DAMAGE[case]
    folder = tmp_path / "m"
    shutil.copytree(sharded_dir, folder)
    damage(folder)
    rc, _, err = run_cli("eval", "--model", str(folder), "--data", "text:" + "hello world " * 200,
                         "--seq-len", "16", "--max-windows", "2")
    assert_one_line_error(rc, err, fragment, "Fix:")


# ---------------------------------------------------------------------------------------------
# 2: the library's boundary: a LoadedModel wherever a model is meant, one line for anything else


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-llama")


def _calls(loaded):
    """name -> fn(model) for every public function that takes a model."""
    from mi_prun.capture import capture
    from mi_prun.config import AnalysisConfig, HealConfig
    from mi_prun.data import calibration_tokens
    from mi_prun.evaluate import generate_sample, perplexity
    from mi_prun.heal import heal, heal_calibration
    from mi_prun.models import find_blocks, pruned_view
    from mi_prun.pipeline import analyze
    from mi_prun.export import export

    text = "text:" + "The quick brown fox jumps over the lazy dog. " * 40
    calib = heal_calibration(loaded, HealConfig(calib=text, n_samples=4, seq_len=32))
    import tempfile

    return {
        "analyze": lambda m: analyze(m, AnalysisConfig(calib=text, n_samples=4, seq_len=32)),
        "perplexity": lambda m: perplexity(m, loaded.tokenizer, text[5:], seq_len=16, max_windows=2),
        "pruned_view": lambda m: pruned_view(m, [1]),
        "find_blocks": lambda m: find_blocks(m),
        "export": lambda m: export(pruned_view(m, [1]) if not isinstance(m, (str, type(None))) else m,
                                   loaded.tokenizer, None, Path(tempfile.mkdtemp()) / "x"),
        "heal": lambda m: heal(m, [1], calib, config=HealConfig(n_samples=4, seq_len=32)),
        "capture": lambda m: capture(m, calib.input_ids, max_positions=64),
        "generate_sample": lambda m: generate_sample(m, loaded.tokenizer, "Hello", max_new_tokens=2),
        "calibration_tokens": lambda m: calibration_tokens(m, text[5:], 4, 16),
    }


@pytest.mark.parametrize("name", ["analyze", "perplexity", "pruned_view", "find_blocks", "export", "heal",
                                  "capture", "generate_sample", "calibration_tokens"])
def test_library_takes_a_loaded_model_and_refuses_others_in_one_line(loaded, name):
    fn = _calls(loaded)[name]
    assert fn(loaded) is not None  # a LoadedModel where a model (or a tokenizer) is meant: accepted
    for bad in ("tiny-llama", None, 3):
        with pytest.raises(MiPrunError) as info:
            fn(bad)
        assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_token_ids_outside_the_vocabulary_are_one_line(loaded, llama_analysis):
    import torch

    from mi_prun.capture import capture
    from mi_prun.evaluate import token_nll

    vocab = loaded.model.get_input_embeddings().num_embeddings
    for ids in (torch.full((2, 8), vocab), torch.full((2, 8), -1), torch.rand(2, 8)):
        for fn in (lambda ids=ids: capture(loaded, ids), lambda ids=ids: token_nll(loaded, ids)):
            with pytest.raises(MiPrunError, match="token id|integer token ids") as info:
                fn()
            assert "Fix:" in str(info.value)
    with pytest.raises(MiPrunError, match="verification tokens holds token id"):
        verified_select(loaded, Analysis.load(llama_analysis), SelectConfig(n=1, verify_passes=2),
                        tokens=torch.full((2, 8), vocab + 5))


def test_prune_force_reaches_every_method(tmp_path, llama_analysis):
    """`--force` accepts another model of the same block count for every method, sleb included
    (its search checks the model too)."""
    for method in ("sleb", "fbs", "shortgpt"):
        rc, _, err = run_cli("prune", "--model", "tiny-qwen2", "--analysis", str(llama_analysis), "--n", "1",
                             "--method", method, "--force", "--out", str(tmp_path / method))
        assert rc == 0, (method, err)
        rc, _, err = run_cli("prune", "--model", "tiny-qwen2", "--analysis", str(llama_analysis), "--n", "1",
                             "--method", method, "--out", str(tmp_path / f"{method}-refused"))
        assert_one_line_error(rc, err, "another model", "--force")
