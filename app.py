"""mi-prun app: the entry point (`streamlit run app.py`).

Sets the wide layout, declares the pages (st.navigation) and draws the sidebar that every page
shares (what the current analysis is). The pages only render and call `mi_prun` functions; their
helpers live in the `mi_prun_app` package (see mi_prun_app/ui.py for what is cached and shared
between sessions).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from mi_prun_app.ui import PAGES, analysis_summary, current_analysis

ROOT = Path(__file__).resolve().parent

st.set_page_config(page_title="mi-prun", page_icon=str(ROOT / "assets" / "logo.svg"), layout="wide",
                   initial_sidebar_state="expanded")
css = ROOT / "assets" / "style.css"
if css.is_file():
    st.html(f"<style>{css.read_text()}</style>")

pages = [
    st.Page(PAGES["setup"], title="Set up and run", icon=":material/tune:", default=True),
    st.Page(PAGES["block_mi"], title="Block MI", icon=":material/bar_chart:"),
    st.Page(PAGES["dpi"], title="DPI spans", icon=":material/grid_on:"),
    st.Page(PAGES["fbs"], title="Fast-Block-Select", icon=":material/route:"),
    st.Page(PAGES["prune"], title="Prune and export", icon=":material/content_cut:"),
]
page = st.navigation(pages)


def sidebar() -> None:
    """Drawn after the page, so that it shows what the page just did (a finished analysis)."""
    with st.sidebar:
        st.markdown("### mi-prun")
        analysis = current_analysis()
        if analysis is None:
            st.caption("No analysis yet: run one on *Set up and run*.")
        else:
            st.caption(analysis_summary(analysis))
        st.caption("Blocks and ranks are numbered from 0 everywhere (rank 0 = most redundant).")


try:
    page.run()
finally:
    # Also after st.stop() in a page (no analysis yet).
    sidebar()
