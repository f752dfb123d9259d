"""Streamlit glue shared by the pages: cached model loading, the session's analysis, selections,
cached perplexity and generation, and the chart/table helpers that add a caption and a CSV download
to everything shown.

What is shared between sessions and what is not:
- models: `st.cache_resource`, one object for every session; never mutated (the analysis runs on
  a private view, pruning uses `pruned_view`, which copies the module structure and shares weights);
- analyses: a server-wide memo (`Memo` in `st.cache_resource`) keyed by model and every config
  field, so a second tab asking for the same analysis reuses it; a session only ever sees the
  analysis it ran or loaded (its own `st.session_state`);
- perplexity and generation: `st.cache_data`, keyed by the removed set (returns copies).

Settings come from the library's configs (see `mi_prun_app.state`): a selection here is
`select(analysis, config=SelectConfig(...))`, perplexity follows `EvalConfig.quick()`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pandas as pd
import streamlit as st

from mi_prun.config import SelectConfig
from mi_prun.data import load_text
from mi_prun.errors import MiPrunError
from mi_prun.evaluate import generate_sample, perplexity
from mi_prun.models import pruned_view
from mi_prun.runtime import load_model
from mi_prun.select import compare, n_protected, select
from mi_prun_app import state
from mi_prun_app.labels import MISSING
from mi_prun_app.tables import csv_bytes, displayed

PAGES = {
    "setup": "pages/1_setup.py",
    "block_mi": "pages/2_block_mi.py",
    "dpi": "pages/3_dpi_spans.py",
    "fbs": "pages/4_fast_block_select.py",
    "prune": "pages/5_prune_export.py",
}
# Methods compared on the FBS and prune pages (the default method first). SLEB is left to the
# CLI/benchmarks: its O(L^2) forward passes would block the page for minutes on a real model.
COMPARE_METHODS = tuple(dict.fromkeys((SelectConfig.method, "fbs", "exact", "topk", "shortgpt", "angular",
                                       "random")))


# ----------------------------------------------------------------------------------------------
# models and analyses


@st.cache_resource(show_spinner=False, max_entries=3)
def get_model(spec: str, trust_remote_code: bool = False):
    """The model for `spec`, loaded once per server process and shared by every session.

    Read-only by contract: nothing in the app writes to it (see the module docstring)."""

    return load_model(spec, device="auto", dtype="auto", trust_remote_code=trust_remote_code)


@st.cache_resource(show_spinner=False)
def analysis_memo() -> state.Memo:
    return state.Memo(maxsize=16)


def set_analysis(analysis: Any, key: str, source: str, trust_remote_code: bool = False,
                 folder: str | None = None) -> None:
    """Make `analysis` this session's current analysis (and forget results tied to the last one).
    `folder`: where it was loaded from (an export never replaces it)."""
    st.session_state["analysis"] = analysis
    st.session_state["analysis_key"] = key
    st.session_state["analysis_source"] = source
    st.session_state["analysis_folder"] = folder
    st.session_state["trust_remote_code"] = trust_remote_code
    st.session_state["selections"] = {}
    st.session_state["ppl_points"] = []
    st.session_state.pop("export_path", None)
    st.session_state.pop("model_checked", None)
    if analysis.n_blocks >= 2:
        # The slider lives on the FBS and prune pages, never on the page that sets an analysis,
        # so its state may be written here.
        st.session_state["p_n_remove"] = state.default_n_remove(analysis.n_blocks)


def current_analysis() -> Any | None:
    return st.session_state.get("analysis")


def require_analysis() -> Any:
    """The session's analysis, or a pointer to the setup page and a stop."""
    analysis = current_analysis()
    if analysis is None:
        st.info("No analysis yet. Run one (or load a saved one) on the set-up page first.")
        st.page_link(PAGES["setup"], label="Go to set-up", icon=":material/tune:")
        st.stop()
    return analysis


def _spec(analysis: Any) -> str:
    return analysis.model.get("spec") or analysis.model.get("source")


def _trust_remote_code() -> bool:
    return bool(st.session_state.get("trust_remote_code", False)) and state.remote_code_allowed()


def model_for(analysis: Any):
    """The cached model an analysis was computed on (loaded if this server has not yet), checked
    by the library to be that model (`Analysis.check_model`)."""
    spec = _spec(analysis)
    with st.spinner(f"Loading {spec} (once per server)..."):
        loaded = get_model(spec, _trust_remote_code())
    checked = (st.session_state.get("analysis_key"), id(loaded))
    if st.session_state.get("model_checked") != checked:
        analysis.check_model(loaded.model, where="this analysis")
        st.session_state["model_checked"] = checked
    return loaded


def n_remove(analysis: Any) -> int:
    """Blocks to remove (the session's choice, clamped to this analysis), without a widget."""
    L = analysis.n_blocks
    n = int(st.session_state.get("p_n_remove", state.default_n_remove(L)))
    return min(max(n, 1), max(L - 1, 1))


def n_slider(analysis: Any) -> int:
    """The "blocks to remove" slider and the protect-ends switch. The same keys on the FBS and
    the prune page, kept for the whole session, so both pages always show the same n."""
    L = analysis.n_blocks
    if L < 2:
        st.info("A model with one block cannot be pruned.")
        st.stop()
    st.session_state["p_n_remove"] = n_remove(analysis)
    c1, c2, c3 = st.columns([3, 2, 2], vertical_alignment="bottom")
    n = c1.slider("Blocks to remove", min_value=1, max_value=L - 1, key="p_n_remove", persist_state="session",
                  help="Prune ratio = blocks removed / blocks. Blocks are numbered from 0.")
    c2.markdown(f"Prune ratio **{100.0 * n / L:.0f} %** ({n} of {L} blocks)")
    c3.checkbox(f"Protect the ends ({protect_label(L)})", key="p_protect_ends",
                value=bool(SelectConfig().protect_ends), persist_state="session",
                help="The first and last blocks of most LLMs do work the middle ones do not; "
                     "the benchmark measured that protecting them helps (benchmarks/RESULTS.md).")
    return int(n)


def protect_on() -> bool:
    return bool(st.session_state.get("p_protect_ends", bool(SelectConfig().protect_ends)))


def protect_label(n_blocks: int) -> str:
    try:
        k = n_protected(n_blocks, state.protect_margin())
    except MiPrunError:
        return "too few blocks to protect"
    return f"never remove the first and last {k} block{'s' if k > 1 else ''}"


def select_config(method: str, n: int) -> SelectConfig:
    """This session's selection settings for `method` and `n` blocks."""
    return state.select_config(method, n, protect=protect_on())


def selection(analysis: Any, method: str, n: int) -> Any:
    """`select(analysis, config=...)` for this session's analysis, memoised in the session
    (milliseconds each, but pages rerun on every widget change)."""

    cfg = select_config(method, n)
    key = (st.session_state.get("analysis_key"), repr(cfg))
    memo = st.session_state.setdefault("selections", {})
    if key not in memo:
        memo[key] = select(analysis, config=cfg)
    return memo[key]


def comparison(analysis: Any, n: int) -> list[dict]:
    cfg = select_config(SelectConfig.method, n)
    key = ("compare", st.session_state.get("analysis_key"), repr(cfg))
    memo = st.session_state.setdefault("selections", {})
    if key not in memo:
        memo[key] = compare(analysis, config=cfg, methods=COMPARE_METHODS)
    return memo[key]


# ----------------------------------------------------------------------------------------------
# cached evaluation (per removed set; st.cache_data hands every session its own copy)


def ppl_protocol_text() -> str:
    cfg = state.eval_config()
    return (f"perplexity on {cfg.data} text, first {cfg.max_windows} windows of {cfg.seq_len} tokens "
            "(short protocol for exploring; use `mi-prun eval` for the full one)")


def ppl_protocol_short() -> str:
    cfg = state.eval_config()
    return f"{cfg.max_windows} windows x {cfg.seq_len} tokens of {cfg.data}"


@st.cache_data(show_spinner=False, max_entries=4)
def eval_text(source: str, max_chars: int) -> str:
    return load_text(source, purpose="evaluation").text[:max_chars]


@st.cache_data(show_spinner=False, max_entries=512)
def perplexity_of(spec: str, trust_remote_code: bool, removed: tuple[int, ...], data: str,
                  seq_len: int, max_windows: int, batch_size: int) -> dict:
    """Perplexity of `spec` without `removed`, under the protocol of an `EvalConfig` (its fields
    are the arguments, so that the cache key is plain data)."""

    loaded = get_model(spec, trust_remote_code)
    model = pruned_view(loaded.model, list(removed)) if removed else loaded.model
    # Only the first `max_windows` windows are scored, so only the head of the text is tokenised:
    # 16 characters per token is more than any tokenizer needs (byte-level: 1, BPE: about 4), and
    # the windows scored are the same as with the whole text.
    text = eval_text(data, max_windows * seq_len * 16)
    return perplexity(model, loaded.tokenizer, text, seq_len=seq_len, max_windows=max_windows,
                      batch_size=batch_size).to_dict()


@st.cache_data(show_spinner=False, max_entries=256)
def generation_of(spec: str, trust_remote_code: bool, removed: tuple[int, ...], prompt: str,
                  max_new_tokens: int) -> str:
    loaded = get_model(spec, trust_remote_code)
    model = pruned_view(loaded.model, list(removed)) if removed else loaded.model
    return generate_sample(model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens)


def ppl(analysis: Any, removed: Sequence[int]) -> dict:
    cfg = state.eval_config()
    model_for(analysis)  # loads with a spinner and checks it is the analysed model
    return perplexity_of(_spec(analysis), _trust_remote_code(), tuple(sorted(int(b) for b in removed)),
                         cfg.data, cfg.seq_len, int(cfg.max_windows), cfg.batch_size)


def generate(analysis: Any, removed: Sequence[int], prompt: str, max_new_tokens: int) -> str:
    model_for(analysis)
    return generation_of(_spec(analysis), _trust_remote_code(), tuple(sorted(int(b) for b in removed)),
                         prompt, max_new_tokens)


# ----------------------------------------------------------------------------------------------
# display helpers


def chart(fig: Any, key: str, caption: str) -> None:
    """A Plotly chart with the plain-language caption saying what to look for."""
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})
    st.caption(caption)


# Columns that hold lists of block numbers: drawn wide, so that a cell is not cut short.
BLOCK_LIST_COLUMNS = ("removed", "P", "A", "proposers", "blocks")


def table(df: pd.DataFrame, name: str, key: str, caption: str | None = None, height: int | str = "auto",
          missing: str = "no value") -> None:
    """A table with a CSV download button under it. Cells without a value read "—" (never None or
    nan), and the caption says what that means (`missing`)."""
    shown, has_missing = displayed(df)
    if has_missing:
        caption = (caption + " " if caption else "") + f"{MISSING} = {missing}."
    wide = {c: st.column_config.TextColumn(width="large") for c in BLOCK_LIST_COLUMNS if c in shown.columns}
    st.dataframe(shown, width="stretch", hide_index=True, key=f"df_{key}", height=height, column_config=wide or None)
    cols = st.columns([1, 3])
    cols[0].download_button("Download CSV", data=csv_bytes(df), file_name=f"{name}.csv",
                            mime="text/csv", key=f"csv_{key}", icon=":material/download:")
    if caption:
        cols[1].caption(caption)


def show_error(exc: BaseException) -> None:
    """A user-fixable problem as an error box; the page keeps working."""
    st.error(str(exc), icon=":material/error:")


def analysis_summary(analysis: Any) -> str:
    m, c = analysis.model, analysis.calibration
    return (f"**{m.get('spec')}** ({m.get('n_blocks')} blocks) - {analysis.estimator} "
            f"({', '.join(f'{k}={v}' for k, v in analysis.estimator_options.items())}) - "
            f"{c.get('n_samples', '?')} x {c.get('seq_len', '?')} tokens of {c.get('source', '?')}")


def copy_analysis(analysis: Any) -> Any:
    # Memo entries are shared by sessions: each session gets its own copy.
    return copy.deepcopy(analysis)
