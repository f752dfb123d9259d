"""The Streamlit app's helpers (`app.py` and `pages/` are the app itself, at the top level).

The core package `mi_prun` holds no app code and never imports Streamlit or this package; the app
builds the library's configs (`mi_prun.config`) and calls the library, so it adds no defaults or
rules of its own.

- `state`: operator settings from the environment, the configs the app builds, export paths,
  uploads, progress and time-left bookkeeping, cancelling, the shared analysis memo, archives.
- `tables`: the DataFrames behind every table (each downloadable as CSV).
- `viz`: the Plotly figures, one colour per selection method.
- `ui`: the Streamlit glue the pages share (cached models, the session's analysis and selections,
  cached perplexity and generation, chart and table helpers).
- `search`: the verified search in the pages (one pass / verified control, the server's NLL cache
  per analysis, progress and cancel, the candidates shown).
- `healing`: the prune page's "heal with a linear bridge" switch (refusals, healed models and
  their perplexity, cached per removed set).

`ui`, `search` and `healing` import Streamlit; `state`, `tables` and `viz` are unit-tested without it.
"""
