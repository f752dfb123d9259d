"""The Streamlit app, headless (streamlit.testing.v1.AppTest), on the tiny random model chosen by
MI_PRUN_TEST_MODEL; plus unit tests of its Streamlit-free helpers (mi_prun_app.state and .tables),
the concurrency guarantees (sessions see only their own results; the cached model never changes)
and the "one source of truth" guarantee (the app, the library and the CLI choose the same blocks)."""

from __future__ import annotations

import base64
import json
import threading
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import yaml

from mi_prun.config import AnalysisConfig, EvalConfig, ExportConfig, SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun_app import state, tables
from mi_prun_app.labels import MISSING, proposer_label

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TEST_MODEL = "tiny-llama"
PAGES = {"block_mi": "pages/2_block_mi.py", "dpi": "pages/3_dpi_spans.py",
         "fbs": "pages/4_fast_block_select.py", "prune": "pages/5_prune_export.py"}


# ----------------------------------------------------------------------------------------------
# helpers


def _decode(obj):
    """Plotly 6+ writes numpy arrays as {"dtype", "bdata", "shape"} (base64); turn them back."""
    if isinstance(obj, dict):
        if "bdata" in obj and "dtype" in obj:
            arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=np.dtype(obj["dtype"]))
            if obj.get("shape"):
                arr = arr.reshape([int(s) for s in str(obj["shape"]).split(",")])
            return arr
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def figures(at) -> dict:
    """Every Plotly chart on the page as a decoded figure dict, by chart key."""
    out = {}
    for el in at.get("plotly_chart"):
        spec = _decode(json.loads(el.proto.spec))
        key = el.proto.id.rsplit("-", 1)[-1] if el.proto.id else str(len(out))
        out[key] = spec
    return out


def trace(fig: dict, name: str) -> dict:
    for t in fig["data"]:
        if t.get("name") == name:
            return t
    raise AssertionError(f"no trace {name!r} in {[t.get('name') for t in fig['data']]}")


def chart(at, title_part: str) -> dict:
    """The figure whose title (or first trace name) contains `title_part`."""
    for fig in figures(at).values():
        title = ((fig.get("layout") or {}).get("title") or {}).get("text") or ""
        names = " ".join(str(t.get("name")) for t in fig["data"])
        if title_part in title or title_part in names:
            return fig
    raise AssertionError(f"no chart matching {title_part!r}")


def no_errors(at) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def model_fingerprint(model) -> dict:
    """What must never change on a shared model: block count, config, hooks, weight identities
    and a checksum of the weights (compared before and after sessions use it)."""
    import torch

    from mi_prun.models.hooks import count_hooks
    from mi_prun.models import find_blocks, num_layers_of

    blocks = find_blocks(model)
    with torch.no_grad():
        checksum = float(sum(float(p.double().abs().sum()) for p in model.parameters()))
    return {"n_blocks": len(blocks), "config_layers": num_layers_of(model.config),
            "hooks": count_hooks(model), "block_ids": [id(b) for b in blocks.blocks],
            "param_ptrs": [p.data_ptr() for p in model.parameters()], "checksum": checksum,
            "training": bool(model.training)}


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("MI_PRUN_TEST_MODEL", TEST_MODEL)
    monkeypatch.setenv("MI_PRUN_EXPORT_DIR", str(tmp_path / "exports"))
    monkeypatch.delenv("MI_PRUN_ALLOW_REMOTE_CODE", raising=False)


def new_app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(APP, default_timeout=120)


def analysed_app(**settings):
    """An app session that ran the default analysis (settings: widget key -> value first)."""
    at = new_app().run()
    no_errors(at)
    for key, value in settings.items():
        at.number_input(key=key).set_value(value) if key in ("p_samples", "p_tokens") else None
    at.button(key="run").click().run()
    no_errors(at)
    assert at.session_state["analysis"] is not None
    return at


@pytest.fixture(scope="module")
def shared_model():
    """The very object every session gets from st.cache_resource for the test model."""
    import os

    os.environ.setdefault("MI_PRUN_TEST_MODEL", TEST_MODEL)
    from mi_prun_app.ui import get_model

    return get_model(TEST_MODEL, False)


# ----------------------------------------------------------------------------------------------
# pages


def test_setup_default_flow_runs_the_tiny_model(shared_model):
    from mi_prun.estimators import get_estimator

    before = model_fingerprint(shared_model.model)
    at = new_app().run()
    no_errors(at)
    assert at.title[0].value == "Set up and run"
    assert at.radio(key="p_model_kind").value == f"Test model ({TEST_MODEL})"  # env var picks the default
    # Every starting value is the library's: AnalysisConfig's fields, the estimator's own options.
    d = AnalysisConfig()
    assert at.selectbox(key="p_estimator").value == d.estimator
    own = get_estimator(d.estimator).options
    assert at.selectbox(key=f"p_opt_{d.estimator}_preprocess").value == own["preprocess"]
    assert at.checkbox(key="p_drop_first").value == d.drop_first
    assert at.number_input(key="p_batch").value == d.batch_size and at.number_input(key="p_seed").value == d.seed
    at.button(key="run").click().run()
    no_errors(at)
    analysis = at.session_state["analysis"]
    assert analysis.model["spec"] == TEST_MODEL and analysis.n_blocks == 6
    assert analysis.calibration["n_samples"] == 8 and analysis.calibration["seq_len"] == 64  # test mode
    assert analysis.estimator == d.estimator and analysis.estimator_options == own
    # The memo key is that of the plain config: untouched option widgets add no options.
    assert at.session_state["analysis_key"] == state.analysis_key(
        TEST_MODEL, d.replace(**state.TEST_MODE_SIZES))
    assert at.status[0].label.startswith(("Analysis finished", "Analysing"))
    assert [p.value for p in at.get("progress")] in ([], [100, 100, 100])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Blocks"] == "6"
    assert model_fingerprint(shared_model.model) == before


def test_block_mi_page(shared_model):
    at = analysed_app()
    analysis = at.session_state["analysis"]
    at.switch_page(PAGES["block_mi"]).run()
    no_errors(at)
    fig = chart(at, "block MI")
    np.testing.assert_allclose(np.asarray(trace(fig, "block MI")["y"], float), analysis.block_mi)
    np.testing.assert_allclose(np.asarray(trace(fig, "cosine BI")["y"], float), analysis.baselines["cosine_bi"])
    n = at.session_state["p_n_remove"]
    outlined = [b for b, c in enumerate(trace(fig, "block MI")["marker"]["line"]["color"]) if c == "#000000"]
    assert sorted(outlined) == sorted(analysis.ranking()[:n])
    stab = chart(at, "Block MI per calibration group")
    np.testing.assert_allclose(np.asarray(stab["data"][0]["z"], float), analysis.block_mi_batches)
    assert any("Kendall" in m.label for m in at.metric)
    assert len(at.get("download_button")) >= 2  # every table has its CSV
    at.toggle(key="bm_outline").set_value(False).run()  # the switch changes the chart
    fig = chart(at, "block MI")
    assert all(c != "#000000" for c in trace(fig, "block MI")["marker"]["line"]["color"])


def test_dpi_page_span_selection(shared_model):
    at = analysed_app()
    analysis = at.session_state["analysis"]
    at.switch_page(PAGES["dpi"]).run()
    no_errors(at)
    fig = chart(at, "Span MI")
    z = np.asarray(trace(fig, "span")["z"], float)
    iu = np.triu_indices(analysis.n_blocks + 1, 1)
    np.testing.assert_allclose(z[iu], analysis.span[iu])
    at.slider(key="dpi_span").set_value((1, 3)).run()  # blocks 1..3 = span (1, 4)
    no_errors(at)
    sel = trace(chart(at, "Span MI"), "selected span")
    assert (sel["y"][0], sel["x"][0]) == (1, 4)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Span MI M[1, 4]"] == f"{analysis.span[1, 4]:.4f} nats"
    profile = chart(at, "Blocks 1..3")
    assert list(np.asarray(profile["data"][0]["x"]).tolist()) == [1, 2, 3]


def test_fbs_page_and_n_slider(shared_model):
    from mi_prun.select import resolve_n, select

    at = analysed_app()
    analysis = at.session_state["analysis"]
    at.switch_page(PAGES["fbs"]).run()
    no_errors(at)
    d = SelectConfig()
    n = at.slider(key="p_n_remove").value
    assert n == resolve_n(analysis.n_blocks, **d.count, protect_ends=d.protect_ends)  # the library's count
    assert at.checkbox(key="p_protect_ends").value == bool(d.protect_ends)
    fbs = select(analysis, "fbs", n=n)
    obj = chart(at, "FBS objective")
    np.testing.assert_allclose(np.asarray(trace(obj, "MI-PRUN (FBS)")["y"], float),
                               [s["objective"] for s in fbs.trajectory])
    pools = chart(at, "Prune pool P")
    assert np.asarray(pools["data"][0]["z"], float).shape == (6, len(fbs.trajectory))
    at.slider(key="p_n_remove").set_value(3).run()
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert len(metrics["FBS removes"].split(",")) == 3
    assert metrics["FBS removes"] == ", ".join(map(str, select(analysis, "fbs", n=3).removed))
    # the sets in full on their own line (a metric cuts a long value short)
    full = f"**FBS removes** blocks {', '.join(map(str, select(analysis, 'fbs', n=3).removed))}; **the exact optimum"
    assert any(md.value.startswith(full) for md in at.markdown)
    comp = chart(at, "MI objective of each method")
    assert len(comp["data"][0]["x"]) == 6  # MI-PRUN, exact and the baselines for the same n
    assert not any("price of its speed" in c.value for c in at.caption)
    at.checkbox(key="p_protect_ends").set_value(False).run()  # the switch reaches the selection
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["FBS removes"] == ", ".join(map(str, select(analysis, "fbs", n=3, protect_ends=False).removed))


def test_prune_page_ppl_generation_and_export(shared_model, tmp_path):
    from mi_prun.evaluate import evaluate
    from mi_prun.models import pruned_view
    from mi_prun.select import select

    before = model_fingerprint(shared_model.model)
    at = analysed_app()
    analysis = at.session_state["analysis"]
    at.switch_page(PAGES["prune"]).run()
    no_errors(at)
    at.slider(key="p_n_remove").set_value(2).run()
    col = chart(at, "Which blocks each method removes")
    fbs = select(analysis, "fbs", n=2)
    assert sorted(trace(col, "MI-PRUN (FBS) removed")["y"]) == list(fbs.removed)
    assert sorted(trace(col, "ShortGPT (cosine BI) removed")["y"]) == list(select(analysis, "shortgpt", n=2).removed)

    at.button(key="ppl_now").click().run()
    no_errors(at)
    points = at.session_state["ppl_points"]
    assert {p["method"] for p in points} == {"fbs", "exact", "shortgpt", "angular", "random"}
    assert all(p["n"] == 2 and np.isfinite(p["ppl"]) for p in points)
    # The app's short protocol is the library's EvalConfig.quick() (on the text available here).
    quick = EvalConfig.quick()
    cfg = state.eval_config()
    assert (cfg.seq_len, cfg.max_windows) == (quick.seq_len, quick.max_windows)
    curve = chart(at, "Perplexity with 2 blocks removed")  # one n: a bar per method, not a lone column of dots
    assert f"{quick.max_windows} windows x {quick.seq_len} tokens" in curve["layout"]["title"]["text"]
    assert {t["type"] for t in curve["data"]} == {"bar"}
    assert any("compute more n" in c.value.lower() for c in at.caption)
    # MI-PRUN's point is the library's default selection with the model at hand: verified.
    verified = select(analysis, config=state.select_config("fbs", 2, True, SelectConfig().verify_passes),
                      model=shared_model)
    fbs_point = next(p for p in points if p["method"] == "fbs")
    assert fbs_point["verified"] and fbs_point["removed"] == " ".join(map(str, verified.removed))
    assert sorted(trace(chart(at, "Which blocks each method removes"), "MI-PRUN (FBS) verified removed")["y"]) \
        == list(verified.removed)
    expected = evaluate(pruned_view(shared_model.model, list(verified.removed)), shared_model.tokenizer, cfg)
    assert fbs_point["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    at.button(key="ppl_curve").click().run()
    assert {p["n"] for p in at.session_state["ppl_points"]} == {1, 2}
    assert trace(chart(at, "Perplexity against blocks removed"), "MI-PRUN (FBS)")["mode"] == "lines+markers"

    at.button(key="gen").click().run()
    no_errors(at)
    assert at.session_state["gen_result"]["removed"] == list(verified.removed)

    root = Path(state.export_root())
    bad = [t for t in at.text_input if t.key and t.key.startswith("pr_export_name")][0]
    bad.set_value("../escape").run()
    at.button(key="export").click().run()
    assert any("'..'" in e.value for e in at.error)
    assert not (root.parent / "escape").exists()
    name = [t for t in at.text_input if t.key and t.key.startswith("pr_export_name")][0]
    name.set_value("tiny-pruned").run()
    at.button(key="export").click().run()
    no_errors(at)
    out = root / "tiny-pruned"
    report = json.loads((out / "mi_prun.json").read_text())
    assert report["removed"] == list(verified.removed) and report["selection"]["verified"]
    assert "healing" not in report  # the heal switch is off by default
    # Provenance filled by the library from the analysis; the mergekit source is never a local path
    # (the tiny random model has no hub id, so the library writes its name and a note).
    assert report["estimator"] == analysis.estimator and report["calibration"] == json.loads(
        json.dumps(analysis.calibration))
    assert report["source_model"] == (shared_model.hub_id or shared_model.spec)
    recipe = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert {src["model"] for sl in recipe["slices"] for src in sl["sources"]} == {report["source_model"]}
    assert (out / "mergekit.yaml").is_file() and (out / "config.json").is_file()
    labels = [d.label for d in at.get("download_button")]
    assert "Download archive (.zip)" in labels and "mergekit.yaml" in labels

    # Exporting again: refused without "replace", done with it (an earlier mi-prun export only).
    assert at.checkbox(key="pr_overwrite").value == ExportConfig().overwrite
    at.button(key="export").click().run()
    assert any("tiny-pruned" in e.value for e in at.error)
    at.checkbox(key="pr_overwrite").set_value(True).run()
    at.button(key="export").click().run()
    no_errors(at)
    assert json.loads((out / "mi_prun.json").read_text())["removed"] == list(verified.removed)
    other = root / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    name = [t for t in at.text_input if t.key and t.key.startswith("pr_export_name")][0]
    name.set_value("not-an-export").run()
    at.button(key="export").click().run()
    assert at.error and (other / "notes.txt").read_text() == "mine"  # never replaced
    assert model_fingerprint(shared_model.model) == before


def test_prune_page_zero_shot_accuracy(shared_model, tmp_path, monkeypatch):
    """Accuracy beside perplexity on the prune page: behind a button, the library's numbers for the
    dense model and each method's set, task files only from the operator's folder."""
    pytest.importorskip("lm_eval")
    from mi_prun.models import pruned_view
    from mi_prun.zeroshot import zero_shot

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    items = [{"q": "The sky is", "c": ["blue", "green"], "a": 0}, {"q": "Fire is", "c": ["cold", "hot", "wet"], "a": 1},
             {"q": "Bees make", "c": ["milk", "honey"], "a": 1}]
    (tasks / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    (tasks / "mc.yaml").write_text(
        "task: app_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: items.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
        "doc_to_target: '{{a}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n", encoding="utf-8")
    monkeypatch.setenv("MI_PRUN_TASKS_DIR", str(tasks))
    before = model_fingerprint(shared_model.model)
    at = analysed_app()
    at.switch_page(PAGES["prune"]).run()
    no_errors(at)
    at.slider(key="p_n_remove").set_value(2).run()
    at.multiselect(key="pr_methods").set_value(["fbs", "shortgpt"]).run()
    assert not at.session_state["acc_rows"]  # nothing computed before the button
    at.text_input(key="acc_names").set_value("../../etc/task.yaml").run()
    at.button(key="acc_now").click().run()
    assert any("looks like a path" in e.value for e in at.error) and not at.session_state["acc_rows"]
    at.text_input(key="acc_names").set_value("").run()
    at.multiselect(key="acc_files").set_value(["mc.yaml"]).run()
    at.button(key="acc_now").click().run()
    no_errors(at)
    rows = at.session_state["acc_rows"]
    assert [r["set"] for r in rows][0] == "dense" and len(rows) == 3 and {r["task"] for r in rows} == {"app_mc"}
    for r in rows:
        removed = [int(b) for b in r["removed"].split()]
        lib = zero_shot(pruned_view(shared_model.model, removed), shared_model.tokenizer, str(tasks / "mc.yaml"))
        assert r["acc"] == pytest.approx(lib.by_task()["app_mc"].acc) and r["items"] == len(items)
    assert model_fingerprint(shared_model.model) == before


# ----------------------------------------------------------------------------------------------
# verified search and healing in the pages


@pytest.fixture
def fresh_nll_caches():
    """Each test starts with no NLL measured (the server-wide cache outlives AppTest sessions)."""
    from mi_prun_app import search

    search._nll_caches.clear()
    yield
    search._nll_caches.clear()


def metrics_of(at) -> dict:
    return {m.label: m.value for m in at.metric}


def nll_cache_of(at):
    from mi_prun_app import search

    return search.nll_cache(at.session_state["analysis_key"])[0]


def library_verified(analysis, model, n: int, protect: bool = True, race: str | None = None):
    """What the app's verified line must be: the library's default selection with the model (race: a
    race mode other than the default)."""
    from mi_prun.select import select

    cfg = state.select_config(SelectConfig.method, n, protect=protect, verify_passes=SelectConfig().verify_passes,
                              verify_race=race)
    return select(analysis, config=cfg, model=model)


def first_removable(at):
    from mi_prun.select.counts import allowed_blocks

    return allowed_blocks(len(at.session_state["analysis"].block_mi), state.protect_margin())


def test_verify_control_defaults_to_the_config_and_says_the_cost(shared_model, fresh_nll_caches):
    at = analysed_app()
    d = SelectConfig()
    for page in (PAGES["fbs"], PAGES["prune"]):  # the same control, with the same state, on both pages
        at.switch_page(page).run()
        no_errors(at)
        assert at.radio(key="p_search").value == ("Verified" if d.verifies else "One pass")
        assert d.verify_passes == "auto" and at.number_input(key="p_verify_passes").value == 0  # 0 = auto
        assert any("a quarter of the passes SLEB-style greedy removal would spend" in c.value for c in at.caption)
    at.number_input(key="p_verify_passes").set_value(3).run()
    at.switch_page(PAGES["fbs"]).run()
    assert at.number_input(key="p_verify_passes").value == 3  # kept across pages
    assert any("at most **3 forward passes**" in c.value for c in at.caption)
    at.radio(key="p_search").set_value("One pass").run()
    no_errors(at)
    assert "Verified answer removes" not in metrics_of(at)
    assert any("no forward pass" in c.value for c in at.caption)


def test_verified_selection_shows_candidates_passes_and_winner(shared_model, fresh_nll_caches):
    from mi_prun.select import select

    at = analysed_app()
    analysis = at.session_state["analysis"]
    at.switch_page(PAGES["fbs"]).run()
    at.slider(key="p_n_remove").set_value(2).run()
    no_errors(at)
    lib = library_verified(analysis, shared_model, 2)
    assert lib.verified and lib.forward_passes > 0
    m = metrics_of(at)
    assert m["Verified answer removes"] == ", ".join(map(str, lib.removed))
    assert m["Winner proposed by"] == proposer_label(lib.winner_source)
    extra = lib.verification["confirm"].get("passes", 0)  # the confirmation's, beyond the budget
    of = "" if lib.verification["race"].get("unit_budget") else f" of {lib.verification['budget']}"  # units: no sets
    assert m["Forward passes"] == f"{lib.forward_passes - extra}{of}" + (f" + {extra}" if extra else "")
    # the status line counts the cached sets, not passes minus sets (the confirmation's passes are no sets)
    from mi_prun_app.search import verified_label

    assert extra and f"{lib.forward_passes} new forward passes (0 sets were cached" in verified_label(lib)
    assert any("Confirmation: " in c.value for c in at.caption)
    assert m["One-pass answer removes"] == ", ".join(map(str, select(analysis, "fbs", n=2).removed))
    assert m["FBS removes"] == m["One-pass answer removes"]  # FBS's own answer is still shown
    assert any("1 dense pass" in c.value for c in at.caption)  # the dense pass is said
    frame = next(df.value for df in at.dataframe if "proposers" in df.value.columns)
    assert len(frame) == len(lib.candidates) and frame["winner"].sum() == 1
    assert frame.loc[frame["winner"], "removed"].item() == " ".join(map(str, lib.removed))
    np.testing.assert_allclose(frame["nll"], [c.nll for c in lib.candidates], rtol=1e-6)
    fig = chart(at, "Verified search")
    assert sorted(trace(fig, "candidate sets")["y"]) == pytest.approx(  # sets of n blocks; put-back steps: table
        sorted(c.nll for c in lib.candidates if len(c.removed) == 2))


def test_the_race_control_runs_the_library_search_in_the_mode_chosen(shared_model, fresh_nll_caches):
    """Race defaults to the library's mode; "units" gives the library's units answer, with its record,
    kept apart from the default's (its own memo entry), and the choice holds across pages."""
    at = analysed_app()
    analysis = at.session_state["analysis"]
    at.switch_page(PAGES["fbs"]).run()
    assert at.selectbox(key="p_verify_race").value == SelectConfig().verify_race
    at.slider(key="p_n_remove").set_value(2).run()
    no_errors(at)
    at.selectbox(key="p_verify_race").set_value("units").run()
    no_errors(at)
    lib = library_verified(analysis, shared_model, 2, race="units")
    assert lib.verification["race"]["mode"] == "units"
    assert metrics_of(at)["Verified answer removes"] == ", ".join(map(str, lib.removed))
    shown = [v for k, v in at.session_state["selections"].items() if "verify_race='units'" in k[1]]
    assert len(shown) == 1 and shown[0].verification["race"]["mode"] == "units"
    assert shown[0].removed == lib.removed
    assert any("Race units: " in c.value for c in at.caption)
    at.switch_page(PAGES["prune"]).run()
    no_errors(at)
    assert at.selectbox(key="p_verify_race").value == "units"  # kept across pages


def test_nll_cache_makes_a_second_visit_of_the_same_n_free(shared_model, fresh_nll_caches):
    a = analysed_app()
    a.switch_page(PAGES["fbs"]).run()
    a.slider(key="p_n_remove").set_value(2).run()
    no_errors(a)
    first = metrics_of(a)
    assert not first["Forward passes"].startswith("0 ")
    seen = len(nll_cache_of(a))
    a.slider(key="p_n_remove").set_value(3).run()  # another n measures new sets...
    no_errors(a)
    assert len(nll_cache_of(a)) > seen
    seen = len(nll_cache_of(a))
    a.slider(key="p_n_remove").set_value(2).run()  # ...coming back costs nothing
    no_errors(a)
    assert metrics_of(a)["Verified answer removes"] == first["Verified answer removes"]
    assert len(nll_cache_of(a)) == seen and not a.status  # nothing recomputed: no progress shown
    # A second tab on the same analysis runs the search again, on the server's NLL cache: 0 passes.
    b = analysed_app()
    assert b.session_state["analysis_key"] == a.session_state["analysis_key"]
    b.switch_page(PAGES["prune"]).run()
    b.slider(key="p_n_remove").set_value(2).run()
    b.switch_page(PAGES["fbs"]).run()
    no_errors(b)
    m = metrics_of(b)
    of = "" if SelectConfig().verify_race == "units" else f" of {SelectConfig().verify_budget(2, len(first_removable(b)))}"
    assert m["Forward passes"] == f"0{of}"  # a budget in token-block units has no count of sets to show
    assert m["Verified answer removes"] == first["Verified answer removes"]
    assert len(nll_cache_of(b)) == seen


def test_cancel_during_verification_leaves_the_page_usable(shared_model, fresh_nll_caches, monkeypatch):
    from mi_prun_app import search

    at = analysed_app()
    analysis = at.session_state["analysis"]
    calls = {"n": 0}

    def cancel_during_the_fourth_pass() -> bool:
        # Checked twice before the first pass (the page's start, then the search's 0 % report that
        # starts the time-left clock) and after every pass: the 6th check comes after the 4th pass,
        # as if Cancel was pressed while it ran.
        calls["n"] += 1
        return calls["n"] > 5

    monkeypatch.setattr(search, "_cancel_requested", cancel_during_the_fourth_pass)
    at.switch_page(PAGES["fbs"]).run()
    at.slider(key="p_n_remove").set_value(2).run()
    no_errors(at)
    assert any("cancelled" in w.value for w in at.warning)
    m = metrics_of(at)
    assert "Verified answer removes" not in m and m["FBS removes"]  # the one-pass answer is shown
    cache = nll_cache_of(at)  # the passes done before the cancel are kept: complete sets, and raced ones in part
    assert len(set(cache.nll) | {k for k, part in cache.partial.items() if part.sums}) == 4
    monkeypatch.undo()
    at.slider(key="p_n_remove").set_value(3).run()  # the page still works
    no_errors(at)
    assert "Verified answer removes" in metrics_of(at)
    at.slider(key="p_n_remove").set_value(2).run()
    assert any("cancelled" in w.value for w in at.warning)  # not restarted behind the user's back
    at.button(key="verify_retry").click().run()
    no_errors(at)
    lib = library_verified(analysis, shared_model, 2)
    m = metrics_of(at)
    assert m["Verified answer removes"] == ", ".join(map(str, lib.removed))
    assert int(m["Forward passes"].split()[0]) < lib.forward_passes  # resumed on the cached passes


def test_heal_switch_adds_healed_lines_and_a_healed_export(shared_model, fresh_nll_caches):
    at = analysed_app()
    at.switch_page(PAGES["prune"]).run()
    at.slider(key="p_n_remove").set_value(2).run()
    at.multiselect(key="pr_methods").set_value(["fbs", "shortgpt"]).run()
    assert at.toggle(key="pr_heal").value is False
    at.button(key="ppl_now").click().run()
    assert not any(p["healed"] for p in at.session_state["ppl_points"])
    at.toggle(key="pr_heal").set_value(True).run()
    at.button(key="ppl_now").click().run()
    no_errors(at)
    points = at.session_state["ppl_points"]
    healed = {p["method"]: p for p in points if p["healed"]}
    plain = {p["method"]: p for p in points if not p["healed"]}
    assert set(healed) == set(plain) == {"fbs", "shortgpt"}
    # with healing on, MI-PRUN is the library's healing default: the one-pass answer
    from mi_prun.select import select as library_select

    one_pass = library_select(at.session_state["analysis"], SelectConfig.for_healing(n=2))
    assert healed["fbs"]["removed"] == plain["fbs"]["removed"] == " ".join(map(str, one_pass.removed))
    assert not healed["fbs"]["verified"]
    assert all(np.isfinite(p["ppl"]) for p in points)
    fig = chart(at, "Perplexity with 2 blocks removed")  # one n: bars, the healed ones hatched
    assert trace(fig, "MI-PRUN (FBS) healed")["marker"]["pattern"]["shape"] == "/"
    assert trace(fig, "ShortGPT (cosine BI) healed")["marker"]["color"] == trace(fig, "ShortGPT (cosine BI)")["marker"]["color"]
    frame = next(df.value for df in at.dataframe if "ppl_healed" in df.value.columns)
    # the verified point measured before healing was on has no healed twin ("—", said in the caption);
    # the two healed sets do; the table names methods as the chart's legend does
    assert (frame["ppl_healed"] != MISSING).sum() == 2 and (frame["healed_ratio"] != MISSING).sum() == 2
    assert "None" not in frame.astype(str).to_numpy().ravel().tolist()
    assert set(frame["method"]) <= {t["name"] for t in fig["data"]}
    assert any(f"{MISSING} = not computed" in c.value for c in at.caption)
    name = [t for t in at.text_input if t.key and t.key.startswith("pr_export_name")][0]
    name.set_value("tiny-healed").run()
    at.button(key="export").click().run()
    no_errors(at)
    report = json.loads((state.export_root() / "tiny-healed" / "mi_prun.json").read_text())
    removed = [int(b) for b in plain["fbs"]["removed"].split()]
    assert report["removed"] == removed and not report["selection"].get("verified")
    assert report["healing"]["removed"] == removed and report["healing"]["runs"]
    assert report["healing"]["runs"][0]["start"] == removed[0]


def test_heal_refusal_is_the_library_one_line(shared_model, fresh_nll_caches):
    """A set starting at block 0 cannot be healed: the page says why, keeps the other lines and
    refuses a healed export of it."""
    from mi_prun.heal import HealRefused, check_healable

    at = analysed_app()
    analysis = at.session_state["analysis"]
    analysis.baselines["cosine_bi"][0] = -1.0  # this session's copy: ShortGPT now removes block 0 first
    at.session_state["selections"] = {}
    at.switch_page(PAGES["prune"]).run()
    at.checkbox(key="p_protect_ends").set_value(False).run()
    at.slider(key="p_n_remove").set_value(1).run()
    at.multiselect(key="pr_methods").set_value(["exact", "shortgpt"]).run()
    at.toggle(key="pr_heal").set_value(True).run()
    no_errors(at)
    with pytest.raises(HealRefused) as refused:
        check_healable(shared_model.model, [0])
    assert [w.value for w in at.warning] == [f"ShortGPT (cosine BI): {refused.value}"]
    at.button(key="ppl_now").click().run()
    no_errors(at)
    points = at.session_state["ppl_points"]
    assert {(p["method"], p["healed"]) for p in points} == {("exact", False), ("exact", True), ("shortgpt", False)}
    at.selectbox(key="pr_export_method").set_value("shortgpt").run()
    at.button(key="export").click().run()
    assert any("starts at block 0" in e.value for e in at.error) and not at.exception
    assert "export_path" not in at.session_state


def test_errors_show_as_st_error_and_the_page_keeps_working():
    at = new_app().run()
    at.radio(key="p_model_kind").set_value("Local folder").run()
    at.text_input(key="p_local_dir").set_value("/nonexistent/model/folder").run()
    at.button(key="run").click().run()
    assert not at.exception
    assert any("not found" in e.value for e in at.error)
    at.radio(key="p_model_kind").set_value(f"Test model ({TEST_MODEL})").run()
    at.number_input(key="p_tokens").set_value(4096).run()  # longer than the model's context
    at.button(key="run").click().run()
    assert not at.exception and any("exceed the context" in e.value for e in at.error)
    at.number_input(key="p_tokens").set_value(64).run()
    at.button(key="run").click().run()
    no_errors(at)


def test_pasted_text_and_cancel():
    at = new_app().run()
    at.radio(key="p_calib_kind").set_value("Paste text").run()
    at.text_area(key="p_pasted").set_value("The quick brown fox jumps over the lazy dog. " * 200).run()
    at.number_input(key="p_samples").set_value(4).run()
    at.number_input(key="p_tokens").set_value(32).run()
    at.session_state["cancel_requested"] = True  # as if Cancel was pressed during the run
    at.button(key="run").click().run()
    assert not at.exception
    assert any("cancelled" in w.value.lower() for w in at.warning)
    assert at.session_state["analysis"] if "analysis" in at.session_state else True
    assert not at.session_state["cancel_requested"]
    at.button(key="run").click().run()
    no_errors(at)
    assert at.session_state["analysis"].calibration["source"] == "text:<string>"
    # Pasted text cannot be reloaded to draw verification tokens: the library's reason is shown and
    # the page keeps the one-pass answer.
    at.switch_page(PAGES["fbs"]).run()
    assert not at.exception and not at.error
    assert any("Verification is not possible here" in w.value and "cannot be reloaded" in w.value
               for w in at.warning)
    assert "FBS removes" in {m.label for m in at.metric} and at.button(key="verify_retry")


def test_second_tab_reuses_the_cached_analysis_and_sessions_stay_apart():
    a = analysed_app()
    b = new_app().run()
    assert "analysis" not in b.session_state  # B sees nothing of A's
    b.button(key="run").click().run()
    no_errors(b)
    assert any("Reused" in s.value for s in b.success)  # not recomputed
    assert b.session_state["analysis"] is not a.session_state["analysis"]  # its own copy
    np.testing.assert_allclose(b.session_state["analysis"].block_mi, a.session_state["analysis"].block_mi)
    # A different analysis in B leaves A's alone
    b.number_input(key="p_samples").set_value(6).run()
    b.button(key="run").click().run()
    no_errors(b)
    assert b.session_state["analysis"].calibration["n_samples"] == 6
    assert a.session_state["analysis"].calibration["n_samples"] == 8


def test_save_and_load_an_analysis_folder(tmp_path):
    at = analysed_app()
    at.text_input(key="p_save_name").set_value("my-analysis").run()
    at.button(key="save_analysis").click().run()
    no_errors(at)
    saved = state.export_root() / "my-analysis"
    assert (saved / "analysis.json").is_file()
    other = new_app().run()
    other.text_input(key="p_load_dir").set_value(str(saved)).run()
    other.button(key="load_analysis").click().run()
    no_errors(other)
    np.testing.assert_allclose(other.session_state["analysis"].span, at.session_state["analysis"].span)
    other.text_input(key="p_load_dir").set_value(str(tmp_path)).run()
    other.button(key="load_analysis").click().run()
    assert not other.exception and any("not a saved analysis" in e.value for e in other.error)


def test_remote_code_checkbox_only_when_the_operator_allows_it(monkeypatch):
    at = new_app().run()
    assert not [c for c in at.checkbox if c.key == "p_trust_remote_code"]
    monkeypatch.setenv("MI_PRUN_ALLOW_REMOTE_CODE", "1")
    at = new_app().run()
    box = [c for c in at.checkbox if c.key == "p_trust_remote_code"]
    assert box and box[0].value is False  # offered, but off by default


def test_pages_without_an_analysis_point_to_setup():
    at = new_app().run()
    for page in PAGES.values():
        at.switch_page(page).run()
        assert not at.exception
        assert any("No analysis yet" in i.value for i in at.info)


# ----------------------------------------------------------------------------------------------
# concurrency: two sessions at once on the same cached model


def test_concurrent_sessions_see_only_their_own_results(shared_model):
    from mi_prun.evaluate import perplexity
    from mi_prun.models import pruned_view
    from mi_prun.pipeline import analyze

    loaded = shared_model
    before = model_fingerprint(loaded.model)
    cfgs = [AnalysisConfig(n_samples=6, seq_len=48, max_positions=256, seed=s) for s in (1, 2)]
    solo = [analyze(loaded, c) for c in cfgs]
    results: dict = {}
    errors: list = []

    def session(k: int) -> None:
        try:
            for _ in range(2):
                a = analyze(loaded, cfgs[k])
                np.testing.assert_allclose(a.block_mi, solo[k].block_mi, rtol=1e-5)
                view = pruned_view(loaded.model, [k + 1])
                p = perplexity(view, loaded.tokenizer, "some text to score " * 40, seq_len=32, max_windows=2)
                results.setdefault(k, []).append((a, p.ppl))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not np.allclose(solo[0].block_mi, solo[1].block_mi)  # the two sessions did differ
    for k in (0, 1):
        assert len({round(p, 6) for _, p in results[k]}) == 1  # the same answer every time
    assert model_fingerprint(loaded.model) == before


# ----------------------------------------------------------------------------------------------
# mi_prun_app.state and mi_prun_app.tables


@pytest.mark.parametrize("name", ["..", "../x", "a/../../b", "/etc/passwd", "a/b", "a\\b", "C:evil", ".hidden",
                                  "", "   ", "x" * 101, "na\u2215me", "sp ace", "-rf", "a\x00b"])
def test_export_path_sanitiser_refuses(name, tmp_path):
    with pytest.raises(MiPrunError):
        state.safe_export_path(name, tmp_path)


def test_export_path_sanitiser_accepts_plain_names_and_stays_inside(tmp_path, monkeypatch):
    assert state.safe_export_path("model-1.pruned_v2", tmp_path) == tmp_path / "model-1.pruned_v2"
    monkeypatch.setenv("MI_PRUN_EXPORT_DIR", str(tmp_path / "ex"))
    assert state.safe_export_path("m") == tmp_path / "ex" / "m"
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "link").symlink_to(tmp_path)  # a symlink planted inside the export folder
    with pytest.raises(MiPrunError):
        state.safe_export_path("link")
    name = state.default_export_name("/some/path/My Model!", "fbs", [3, 4])
    assert state.safe_export_path(name, tmp_path).parent == tmp_path


def test_export_dir_default(monkeypatch):
    monkeypatch.delenv("MI_PRUN_EXPORT_DIR")
    assert state.export_root() == Path("exports").absolute()


def test_uploads_are_only_decoded():
    assert state.text_from_upload("a.txt", "héllo".encode()) == "héllo"
    assert state.text_from_upload("a.jsonl", b'{"text": "a"}\n{"text": "b"}\n') == "a\n\nb"
    with pytest.raises(MiPrunError, match="only"):
        state.text_from_upload("a.pkl", b"\x80\x04K\x01.")
    with pytest.raises(MiPrunError, match="binary"):
        state.text_from_upload("a.txt", b"abc\x00def")
    with pytest.raises(MiPrunError, match="20 MB"):
        state.text_from_upload("a.txt", b"a" * (state.UPLOAD_LIMIT_BYTES + 1))
    with pytest.raises(MiPrunError, match="line 1"):
        state.text_from_upload("a.jsonl", b"not json")


def test_progress_tracker_and_time_left():
    now = [0.0]
    tr = state.ProgressTracker(clock=lambda: now[0])
    assert tr.update("load", 0.0, "loading") == "load"
    assert tr.eta_text().startswith("estimating")
    now[0] = 1.0
    tr.update("load", 1.0)
    now[0] = 3.0
    assert tr.update("capture", 0.5, "batch 1/2") == "capture"
    assert tr.fractions["load"] == 1.0 and tr.fractions["capture"] == 0.5
    left = tr.seconds_left()
    assert left is not None and left > 0
    assert tr.update("span", 0.5) == "score"
    assert tr.fractions["capture"] == 1.0 and 0 < tr.fractions["score"] < 1
    tr.update("baselines", 1.0)
    assert tr.overall() == pytest.approx(1.0)
    assert tr.eta_text() == "almost done"


def test_cancellable_progress_raises():
    seen = []
    flag = {"cancel": False}
    cb = state.cancellable(lambda s, f, m: seen.append(s), lambda: flag["cancel"])
    cb("capture", 0.5, "")
    flag["cancel"] = True
    with pytest.raises(state.Cancelled):
        cb("capture", 0.6, "")
    assert seen == ["capture"]


def test_tables_and_archives(tmp_path):
    import pandas as pd

    from mi_prun.results import rank_blocks
    from tests.test_viz import synthetic_analysis

    a = synthetic_analysis()
    df = tables.ranking_frame(a)
    assert list(df["block"]) == list(range(a.n_blocks))
    # Ranks are 0-based like blocks (rank 0 = most redundant) and follow the library's rank_blocks.
    for col in ("rank_mi", "rank_cosine_bi", "rank_angular"):
        assert sorted(df[col]) == list(range(a.n_blocks))
    assert df.loc[df["rank_mi"] == 0, "block"].item() == a.ranking()[0]
    assert list(df.sort_values("rank_mi")["block"]) == rank_blocks(a.block_mi) == a.ranking()
    assert list(df.sort_values("rank_cosine_bi")["block"]) == rank_blocks(a.baselines["cosine_bi"], descending=False)
    single = [a.baselines["angular"][b, b + 1] for b in range(a.n_blocks)]
    np.testing.assert_allclose(df["angular_distance"], single)
    assert list(df.sort_values("rank_angular")["block"]) == rank_blocks(single, descending=False)
    assert tables.csv_bytes(df).decode().splitlines()[0].startswith("block,block_mi,rank_mi")
    spans = tables.span_frame(a)
    assert len(spans) == (a.n_blocks + 1) * a.n_blocks // 2
    assert not tables.violations_frame(a).empty
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mi_prun.json").write_text("{}")
    (tmp_path / "m" / "sub").mkdir()
    (tmp_path / "m" / "sub" / "x.txt").write_text("x")
    with zipfile.ZipFile(BytesIO(state.zip_folder(tmp_path / "m"))) as zf:
        assert sorted(zf.namelist()) == ["m/mi_prun.json", "m/sub/x.txt"]
    assert isinstance(tables.comparison_frame([{"method": "fbs", "removed": [1, 2]}]), pd.DataFrame)


def test_memo_is_bounded_and_keyed_by_every_setting():
    m = state.Memo(maxsize=2)
    for k in "abc":
        m.put(k, k)
    assert len(m) == 2 and m.get("a") is None and m.get("c") == "c"
    k1 = state.analysis_key("tiny-llama", AnalysisConfig(calib="text:" + "x" * 1000))
    k2 = state.analysis_key("tiny-llama", AnalysisConfig(calib="text:" + "x" * 999))
    k3 = state.analysis_key("tiny-llama", AnalysisConfig(calib="text:" + "x" * 1000, seed=1))
    assert len({k1, k2, k3}) == 3


# ----------------------------------------------------------------------------------------------
# one source of truth: the app, the library and the CLI choose the same blocks


def test_app_library_and_cli_remove_the_same_blocks_by_default(tmp_path, monkeypatch):
    """For one saved analysis, the app's default selection (its helpers and its FBS / prune pages)
    equals `select(analysis)` with default arguments and `mi-prun select` with no flags."""
    from mi_prun.cli import main
    from mi_prun.runtime import load_model
    from mi_prun.pipeline import analyze
    from mi_prun.results import Analysis
    from mi_prun.select import Selection, select

    folder = tmp_path / "analysis"
    analyze(load_model(TEST_MODEL), AnalysisConfig(n_samples=8, seq_len=48)).save(folder)
    analysis = Analysis.load(folder)
    L = analysis.n_blocks

    library = select(analysis)  # every default is SelectConfig's
    monkeypatch.chdir(tmp_path)
    assert main(["select", str(folder), "--out", "sel.json"]) == 0
    cli = Selection.load(tmp_path / "sel.json")

    n = state.default_n_remove(L)
    app = select(analysis, config=state.select_config(SelectConfig.method, n, protect=True))
    assert library.removed == cli.removed == app.removed
    assert (app.method, app.run_cost, app.n) == (library.method, library.run_cost, library.n)
    assert app.options == library.options == cli.options

    # The same through the app's pages: load the folder, read the FBS metric and the prune page.
    at = new_app().run()
    at.text_input(key="p_load_dir").set_value(str(folder)).run()
    at.button(key="load_analysis").click().run()
    no_errors(at)
    at.switch_page(PAGES["fbs"]).run()
    no_errors(at)
    assert at.slider(key="p_n_remove").value == n
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["FBS removes"] == ", ".join(map(str, library.removed))
    at.switch_page(PAGES["prune"]).run()
    no_errors(at)
    assert at.selectbox(key="pr_export_method").value == SelectConfig.method
    col = chart(at, "Which blocks each method removes")
    assert sorted(trace(col, "MI-PRUN (FBS) removed")["y"]) == list(library.removed)
    # With the model at hand the default is verified: the app's verified line is the library's and the
    # CLI's `select --model` answer (same budget and verification tokens).
    cfg = state.select_config(SelectConfig.method, n, protect=True, verify_passes=SelectConfig().verify_passes)
    lib_verified = select(analysis, config=cfg, model=load_model(TEST_MODEL))
    assert main(["select", str(folder), "--model", TEST_MODEL, "--verify-samples", str(cfg.verify_samples),
                 "--verify-tokens", str(cfg.verify_seq_len), "--out", "sel_v.json"]) == 0
    cli_verified = Selection.load(tmp_path / "sel_v.json")
    assert lib_verified.verified and cli_verified.verified
    assert sorted(trace(col, "MI-PRUN (FBS) verified removed")["y"]) == list(lib_verified.removed) \
        == list(cli_verified.removed)


def test_progress_text_says_the_time_left():
    """The app's bars (verification, healing, the perplexity curve) put the time left after the
    library's message, estimated by `mi_prun.progress.TimeLeft`; a finished step says only its message."""
    from mi_prun.progress import TimeLeft

    now = [0.0]
    left = TimeLeft(clock=lambda: now[0])
    left.update("verify", 0.0)
    now[0] = 12.0
    text = state.progress_text("set 3 of at most 22 (19 left in the budget): NLL 3.1", left.update("verify", 3 / 22),
                               3 / 22)
    assert text == "set 3 of at most 22 (19 left in the budget): NLL 3.1 - about 76 s left"
    assert state.progress_text("22 sets scored", 0.0, 1.0) == "22 sets scored"


def test_verify_every_n_in_the_background_gives_the_library_answers_and_marks_them(shared_model, fresh_nll_caches):
    """'Verify every n' runs in a background thread while the page stays usable; each n it verifies is
    the library's verified answer for that n (from a cold cache), the page marks which n are verified
    and which are one-pass, and the current n then costs no pass."""
    from mi_prun_app import search

    search._curve_jobs.clear()
    at = analysed_app()
    at.switch_page(PAGES["prune"]).run()
    no_errors(at)
    n = at.slider(key="p_n_remove").value
    mark = next(c.value for c in at.caption if "**Verified** (checked by forward passes)" in c.value)
    assert f"n = {n}" in mark and "**one-pass**" in mark  # the current n was verified in the foreground
    at.button(key="curve_start").click().run()
    no_errors(at)
    job = search._curve_jobs().get(next(iter(search._curve_jobs()._data)))
    job.thread.join(timeout=600)
    assert not job.running and job.error is None and job.progress() == (len(job.ns), len(job.ns))
    analysis = at.session_state["analysis"]
    for k, sel in job.results.items():
        lib = library_verified(analysis, shared_model, k)
        assert sel.verified and sel.removed == lib.removed and sel.nll == pytest.approx(lib.nll), k
    at.run()
    no_errors(at)
    mark = next(c.value for c in at.caption if "**Verified** (checked by forward passes)" in c.value)
    assert mark.split("at n = ")[1].split(";")[0] == ", ".join(map(str, sorted(job.results)))
    other = next(k for k in job.ns if k != n)
    at.slider(key="p_n_remove").set_value(other).run()  # the background answer: no verification runs
    no_errors(at)
    assert not at.status
    col = chart(at, "Which blocks each method removes")
    assert sorted(trace(col, "MI-PRUN (FBS) verified removed")["y"]) == list(job.results[other].removed)
    search._curve_jobs.clear()


def test_the_background_curve_takes_the_slider_n_next_and_says_the_time_left():
    """The n the user looks at jumps the queue of 'Verify every n'; the time left is the mean pace of
    the n done times the n left; a stop keeps what was done."""
    import threading

    from mi_prun_app.state import CurveJob

    order: list[int] = []
    gate = threading.Event()

    def verify(k: int) -> int:
        if not order:
            gate.wait(10)  # the first n waits until the page asked for n = 5
        order.append(k)
        return k * 10

    job = CurveJob(range(1, 7), verify, threading.Lock())
    assert job.seconds_left() is None
    job.start()
    job.prefer(5)
    job.prefer(99)  # not an n of the curve: ignored
    gate.set()
    job.thread.join(10)
    assert order == [1, 5, 2, 3, 4, 6] and job.results == {k: k * 10 for k in range(1, 7)}
    assert job.seconds_left() == 0.0 and set(job.seconds) == set(range(1, 7))

    stopped = CurveJob(range(1, 5), lambda k: (stopped.cancel() if k == 2 else None) or k, threading.Lock())
    stopped.start()
    stopped.thread.join(10)
    assert sorted(stopped.results) == [1, 2] and stopped.seconds_left() == pytest.approx(
        sum(stopped.seconds.values()) / 2 * 2)
