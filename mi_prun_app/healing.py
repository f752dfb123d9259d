"""Streamlit glue of healing (`mi_prun.heal`): the prune page's "heal with a linear bridge" switch.

- `refusal`: the library's one-line refusal (`check_healable`) for a removed set, or None.
- `healed_model`: the healed pruned model of a removed set, shared by every session like the models
  (`st.cache_resource`; a `pruned_view` sharing the original's weights except the folded ones, so the
  cached original never changes). Calibration tokens follow `HealConfig()` (smaller in test mode).
- `healed_ppl` / `healed_generation`: perplexity and a generation sample of the healed model, cached
  per removed set like the unhealed ones.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import streamlit as st

from mi_prun.config import HealConfig
from mi_prun.evaluate import generate_sample, perplexity
from mi_prun.heal import HealRefused, check_healable, heal, heal_calibration
from mi_prun_app import state
from mi_prun_app.ui import _spec, _trust_remote_code, eval_text, get_model, model_for


def heal_key(analysis: Any) -> tuple:
    """The healing settings of `analysis` as plain hashable data (the cache key)."""
    return tuple(sorted(asdict(state.heal_config(analysis)).items()))


def heal_text(analysis: Any) -> str:
    cfg = state.heal_config(analysis)
    return (f"a closed-form linear bridge per removed run, fitted on {cfg.n_samples} x {cfg.seq_len} tokens of "
            f"{cfg.calib} text and folded into the block before the run (the architecture is unchanged)")


def refusal(analysis: Any, removed: Sequence[int]) -> str | None:
    """The library's one-line reason why `removed` cannot be healed on this model, or None."""

    try:
        check_healable(model_for(analysis).model, list(removed))
    except HealRefused as exc:
        return str(exc)
    return None


@st.cache_resource(show_spinner=False, max_entries=2)
def _calibration(spec: str, trust_remote_code: bool, key: tuple):
    return heal_calibration(get_model(spec, trust_remote_code), HealConfig(**dict(key)))


@st.cache_resource(show_spinner=False, max_entries=16)
def _healed(spec: str, trust_remote_code: bool, removed: tuple[int, ...], key: tuple):
    loaded = get_model(spec, trust_remote_code)
    return heal(loaded.model, list(removed), _calibration(spec, trust_remote_code, key), config=HealConfig(**dict(key)))


def healed_model(analysis: Any, removed: Sequence[int]) -> tuple[Any, Any]:
    """(healed pruned model, `Healing` record) for `removed`; raises `HealRefused` (one line)."""
    model_for(analysis)
    rem = tuple(sorted(int(b) for b in removed))
    with st.spinner(f"Healing blocks {list(rem)}: fitting a bridge per removed run (once per server)..."):
        return _healed(_spec(analysis), _trust_remote_code(), rem, heal_key(analysis))


@st.cache_data(show_spinner=False, max_entries=512)
def _healed_ppl(spec: str, trust_remote_code: bool, removed: tuple[int, ...], key: tuple, data: str,
                seq_len: int, max_windows: int, batch_size: int) -> dict:
    model, _ = _healed(spec, trust_remote_code, removed, key)
    text = eval_text(data, max_windows * seq_len * 16)  # as ui.perplexity_of: the windows scored only
    return perplexity(model, get_model(spec, trust_remote_code).tokenizer, text, seq_len=seq_len,
                      max_windows=max_windows, batch_size=batch_size).to_dict()


def healed_ppl(analysis: Any, removed: Sequence[int]) -> dict:
    """Perplexity of the healed model under the app's protocol; raises `HealRefused`."""
    cfg = state.eval_config()
    healed_model(analysis, removed)  # refuses, or heals with a spinner, before the cached evaluation
    return _healed_ppl(_spec(analysis), _trust_remote_code(), tuple(sorted(int(b) for b in removed)), heal_key(analysis),
                       cfg.data, cfg.seq_len, int(cfg.max_windows), cfg.batch_size)


@st.cache_data(show_spinner=False, max_entries=256)
def _healed_generation(spec: str, trust_remote_code: bool, removed: tuple[int, ...], key: tuple, prompt: str,
                       max_new_tokens: int) -> str:
    model, _ = _healed(spec, trust_remote_code, removed, key)
    return generate_sample(model, get_model(spec, trust_remote_code).tokenizer, prompt, max_new_tokens=max_new_tokens)


def healed_generation(analysis: Any, removed: Sequence[int], prompt: str, max_new_tokens: int) -> str:
    healed_model(analysis, removed)
    return _healed_generation(_spec(analysis), _trust_remote_code(), tuple(sorted(int(b) for b in removed)),
                              heal_key(analysis), prompt, max_new_tokens)
