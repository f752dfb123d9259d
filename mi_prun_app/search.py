"""Streamlit glue of the verified search (`mi_prun.select.verify`), shared by the FBS and prune pages.

- `search_controls`: "One pass" or "Verified" and the pass budget (defaults: `SelectConfig()`), with
  the cost said in the UI. Same keys on both pages, kept for the session.
- `nll_cache`: one `NLLCache` per analysis for the whole server (a `Memo` like the analyses', with a
  lock so that two tabs never verify on one cache at once): a removed set measured once, at any n
  and in any tab, costs no forward pass again, so moving the slider back and forth is free.
- `verified`: the verified selection of the current n only (never every n at once), memoised in the
  session, computed with a progress bar and a cancel button; a cancel or a refusal leaves the page
  on the one-pass answer with a button to verify again.
- `verified_section`: the winner, where it came from, the passes spent, the one-pass answer and its
  gap, and every candidate with its NLL (chart and table).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import streamlit as st

from mi_prun.config import SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun.progress import TimeLeft
from mi_prun.select import NLLCache, one_pass_estimate, select, stop_note
from mi_prun.select.confirm import describe_confirmation
from mi_prun.select.counts import allowed_blocks
from mi_prun_app import state, tables, viz
from mi_prun_app.labels import proposer_label
from mi_prun_app.ui import chart, model_for, protect_on, selection, table

SEARCH_MODES = ("One pass", "Verified")
DEFAULT_METHOD = SelectConfig.method
_NEW_CACHE = threading.Lock()


def default_mode() -> str:
    return SEARCH_MODES[1] if SelectConfig().verifies else SEARCH_MODES[0]


def default_widget_value() -> int:
    """The pass-budget field's default: 0 (= auto) when the library's default is auto."""
    d = SelectConfig().verify_passes
    return 0 if d == SelectConfig.AUTO else max(int(d), 1)


# the race modes as the app names them (SelectConfig.verify_race; mi_prun.select.race)
RACE_LABELS = {"sets": "sets: the same search, faster", "units": "units: a longer search, same cost",
               "off": "off: every set on every sample"}
RACE_TEXT = {"sets": "clearly worse sets are dropped after a few samples, the budget counts sets (the unraced "
                     "answer, faster).",
             "units": "clearly worse sets are dropped after a few samples and what that saves buys more exchanges "
                      "and swaps (better where the budget stops the search, about the cost of an unraced search).",
             "off": "every set is scored on every sample."}


def race_mode() -> str:
    """The session's race mode (SelectConfig's default until the Race control is changed)."""
    value = st.session_state.get("p_verify_race", SelectConfig().verify_race)
    return value if value in SelectConfig.RACE_MODES else SelectConfig().verify_race


def from_widget(value: Any) -> int | str:
    """The pass-budget field's value as `verify_passes`: 0 means "auto" (one pass is the other mode)."""
    return SelectConfig.AUTO if int(value) == 0 else int(value)


def budget_text(passes: int | str, n: int | None = None, removable: int | None = None) -> str:
    """The budget in words: a number, or auto with its value for this n when known."""
    if passes != SelectConfig.AUTO:
        return f"at most **{passes} forward passes**"
    text = "a quarter of the passes SLEB-style greedy removal would spend"
    if n is not None and removable is not None:
        text += f" (**{SelectConfig().verify_budget(n, removable)} forward passes** for {n} blocks)"
    return text


def cost_text(passes: int | str) -> str:
    cfg = state.select_config(DEFAULT_METHOD, None, True, passes, race_mode())
    measured = st.session_state.get("verify_s_per_pass")
    speed = (f"Measured here: about {state.fmt_seconds(measured)} per pass." if measured else
             "Each pass is one forward pass of the pruned model on the verification tokens: about 4 s for "
             "SmolLM2-135M on a CPU.")
    return (f"Verified: the one-pass answer is checked against every criterion's candidate sets, then improved "
            f"by exchanging and swapping blocks, with {budget_text(passes)} of the pruned model on "
            f"{cfg.verify_samples} x {cfg.verify_seq_len} calibration tokens kept apart from the analysis's "
            f"(plus one dense pass, once). {speed} Only the current n is verified; sets measured before (any n, "
            f"any tab) are free. Race {cfg.verify_race}: {RACE_TEXT[cfg.verify_race]}")


def search_controls() -> int | str:
    """The search choice and the pass budget; returns `verify_passes` (0 = one pass, "auto" or a number)."""
    c1, c2, c4, c3 = st.columns([2, 1, 2, 3], vertical_alignment="bottom")
    mode = c1.radio("Search", SEARCH_MODES, index=SEARCH_MODES.index(default_mode()), key="p_search",
                    horizontal=True, persist_state="session",
                    help="One pass: MI-PRUN's answer from the analysis alone (milliseconds). Verified: "
                         "that answer and the other criteria's candidates scored by forward passes, then "
                         "improved by local search; the lowest loss wins (the library's default when the "
                         "model is at hand).")
    # The session's value, read before the widget: on a page switch the widget can hand back the
    # value it last had on this page, while the session holds the one set on the other page.
    current = int(st.session_state.get("p_verify_passes", default_widget_value()))
    c2.number_input("Pass budget (0 = auto)", min_value=0, max_value=1000, value=current, step=1,
                    key="p_verify_passes", persist_state="session", disabled=mode != SEARCH_MODES[1],
                    help="At most this many forward passes per n (SelectConfig.verify_passes). 0 = auto, the "
                         "library's default: a quarter of the passes SLEB-style greedy removal would spend for "
                         "the same n.")
    race = race_mode()  # read before the widget, as the budget above
    c4.selectbox("Race", SelectConfig.RACE_MODES, index=SelectConfig.RACE_MODES.index(race),
                 format_func=RACE_LABELS.get, key="p_verify_race", persist_state="session",
                 disabled=mode != SEARCH_MODES[1],
                 help="How the verified search spends its budget (SelectConfig.verify_race; the library's default "
                      f"is {SelectConfig().verify_race}). "
                      + " ".join(f"{m}: {RACE_TEXT[m]}" for m in SelectConfig.RACE_MODES))
    if mode == SEARCH_MODES[1]:
        chosen = from_widget(current)
        c3.caption(cost_text(chosen))
        return chosen
    c3.caption("One pass: no forward pass; the answer comes from the analysis alone.")
    return 0


# ----------------------------------------------------------------------------------------------
# the NLL cache and the verified selection


@st.cache_resource(show_spinner=False)
def _nll_caches() -> state.Memo:
    return state.Memo(maxsize=8)


def nll_cache(key: str) -> tuple[Any, threading.Lock]:
    """The server's (NLLCache, lock) for one analysis key (created on first use)."""

    memo = _nll_caches()
    with _NEW_CACHE:
        entry = memo.get(key)
        if entry is None:
            entry = (NLLCache(), threading.Lock())
            memo.put(key, entry)
    return entry


def removable(analysis: Any) -> int:
    """How many blocks the session's protect setting lets a selection remove."""

    return len(allowed_blocks(len(analysis.block_mi), state.protect_margin() if protect_on() else False))


def _cancel_requested() -> bool:
    return bool(st.session_state.get("verify_cancel_requested"))


def _request_cancel() -> None:
    st.session_state["verify_cancel_requested"] = True


def _forget(key: tuple) -> None:
    st.session_state.setdefault("verify_skipped", {}).pop(key, None)


def _key(method: str, n: int, passes: int | str) -> tuple:
    cfg = state.select_config(method, n, protect_on(), passes, race_mode())
    return (st.session_state.get("analysis_key"), repr(cfg), "verified"), cfg


def known_verified(method: str, n: int, passes: int | str) -> Any | None:
    """The verified selection if this session already has it, or the background curve verified it
    (no pass spent), else None."""
    found = st.session_state.setdefault("selections", {}).get(_key(method, n, passes)[0])
    if found is None and method == DEFAULT_METHOD:
        job = curve_job(passes)
        found = None if job is None else job.results.get(int(n))
    return found


def verified(analysis: Any, method: str, n: int, passes: int | str, area: Any = None) -> Any | None:
    """The verified selection of `method` for n blocks, or None when it was cancelled or refused
    (then `notice` says why). Computed here, with progress and a cancel button, if this session
    does not have it yet; the server's NLL cache makes sets seen before free."""

    key, cfg = _key(method, n, passes)
    memo = st.session_state.setdefault("selections", {})
    skipped = st.session_state.setdefault("verify_skipped", {})
    background = known_verified(method, n, passes) if key not in memo else None
    if background is not None:  # the background curve got there first: no pass to spend
        memo[key] = background
    if key in memo or key in skipped:
        st.session_state["verify_cancel_requested"] = False  # a click after the run ended
        return memo.get(key)
    area = area if area is not None else st.container()
    status = None
    try:
        loaded = model_for(analysis)
        cache, lock = nll_cache(str(st.session_state.get("analysis_key")))
        status = area.status(f"Verifying {n} blocks removed: up to {cfg.verify_budget(n, removable(analysis))} "
                             "forward passes...", expanded=True)
        with status:
            bar = st.progress(0, text="preparing the verification tokens and the candidates")
            st.button("Cancel verification", key="verify_cancel", on_click=_request_cancel, icon=":material/stop:")

        left = TimeLeft()

        def on_progress(stage: str, fraction: float, message: str = "") -> None:
            bar.progress(int(round(100 * min(max(fraction, 0.0), 1.0))),
                         text=state.progress_text(message or stage, left.update(stage, fraction), fraction))

        progress = state.cancellable(on_progress, _cancel_requested)
        progress("verify", 0.0, "preparing the verification tokens and the candidates")  # a cancel already clicked
        if not lock.acquire(blocking=False):
            bar.progress(0, text="waiting for another tab verifying on this analysis")
            lock.acquire()
        try:
            sel = select(analysis, config=cfg, model=loaded, cache=cache, progress=progress)
        finally:
            lock.release()
    except state.Cancelled:
        st.session_state["verify_cancel_requested"] = False
        skipped[key] = "cancelled"
        if status is not None:
            status.update(label="Verification cancelled", state="error", expanded=False)
        return None
    except MiPrunError as exc:
        skipped[key] = str(exc)
        if status is not None:
            status.update(label="Verification not possible", state="error", expanded=False)
        return None
    spent = sel.forward_passes + int((sel.verification or {}).get("dense_passes") or 0)
    if spent:
        st.session_state["verify_s_per_pass"] = sel.seconds / spent
    status.update(label=verified_label(sel),
                  state="complete", expanded=False)
    memo[key] = sel
    return sel


def verified_label(sel: Any) -> str:
    """The verification's one-line summary: time, new passes, sets served by the cache, sets the race dropped."""
    race = (sel.verification or {}).get("race") or {}
    raced = (f", {race['dropped']} sets dropped early by the race" if race.get("dropped") else "")
    cached = sum(1 for c in sel.candidates if c.cached)  # forward_passes also counts the confirmation's
    return (f"Verified in {state.fmt_seconds(sel.seconds)}: {sel.forward_passes} new forward passes ({cached} sets "
            f"were cached{raced})")


def notice(method: str, n: int, passes: int | str) -> None:
    """Why the verified answer is missing (cancelled or refused), and a button to try again."""
    key, _ = _key(method, n, passes)
    why = st.session_state.get("verify_skipped", {}).get(key)
    if why is None:
        return
    if why == "cancelled":
        st.warning(f"Verification of {n} blocks was cancelled: showing the one-pass answer. Sets measured "
                   "before the cancel are kept, so verifying again costs fewer passes.", icon=":material/cancel:")
    else:
        st.warning(f"Verification is not possible here: {why} Showing the one-pass answer.",
                   icon=":material/warning:")
    st.button(f"Verify {n} blocks", key="verify_retry", on_click=_forget, args=(key,), icon=":material/replay:")


def default_selection(analysis: Any, n: int, passes: int | str, area: Any = None) -> tuple[Any, Any | None]:
    """(the one-pass selection of the default method, its verified selection or None)."""
    one = selection(analysis, DEFAULT_METHOD, n)
    if not passes:
        return one, None
    return one, verified(analysis, DEFAULT_METHOD, n, passes, area)


# ----------------------------------------------------------------------------------------------
# every n in the background


@st.cache_resource(show_spinner=False)
def _curve_jobs() -> state.Memo:
    return state.Memo(maxsize=8)


def _curve_key(passes: int | str) -> str:
    cfg = state.select_config(DEFAULT_METHOD, None, protect_on(), passes, race_mode())
    return f"{st.session_state.get('analysis_key')}|{cfg!r}"


def curve_job(passes: int | str) -> state.CurveJob | None:
    """The background verification of every n for the session's analysis and settings, if started."""
    if not passes or st.session_state.get("analysis_key") is None:
        return None
    return _curve_jobs().get(_curve_key(passes))


def start_curve(analysis: Any, passes: int | str) -> state.CurveJob:
    """Start verifying every n (1 .. the removable blocks) in a background thread, shared by every
    tab on this analysis and these settings; one already running or done is returned as it is."""
    key = _curve_key(passes)
    job = _curve_jobs().get(key)
    if job is not None:
        return job
    loaded = model_for(analysis)
    cache, lock = nll_cache(str(st.session_state.get("analysis_key")))
    protect, race = protect_on(), race_mode()  # read here: the thread has no session

    def verify(k: int) -> Any:
        return select(analysis, config=state.select_config(DEFAULT_METHOD, k, protect, passes, race), model=loaded,
                      cache=cache)

    ns = range(1, min(analysis.n_blocks - 1, removable(analysis)) + 1)
    job = state.CurveJob(ns, verify, lock)
    _curve_jobs().put(key, job)
    return job.start()


def verified_ns(analysis: Any, passes: int | str) -> list[int]:
    """The n whose verified answer this session has (its own or the background curve's)."""
    if not passes:
        return []
    return [k for k in range(1, analysis.n_blocks) if known_verified(DEFAULT_METHOD, k, passes) is not None]


def curve_controls(analysis: Any, passes: int | str, n: int) -> None:
    """'Verify every n' with its progress (refreshed every second while it runs), and the mark of
    which n are verified and which are one-pass answers."""
    if not passes:
        st.caption("**One pass** at every n: the answers come from the analysis alone (no forward pass).")
        return
    job = curve_job(passes)
    if job is not None and job.running:
        job.prefer(n)  # the n on the slider comes next
    if job is None:
        st.button("Verify every n in the background", key="curve_start", icon=":material/playlist_play:",
                  on_click=start_curve, args=(analysis, passes),
                  help="Verifies MI-PRUN's answer for every number of removed blocks, one n after another, while "
                       "you keep using the page; each n reuses the sets measured at the others, and the race drops "
                       "clearly worse sets after a few samples. The curve's MI-PRUN line becomes verified (diamonds) "
                       "wherever it is done.")
    _curve_progress(analysis, _curve_key(passes), passes, n)


def _curve_progress(analysis: Any, key: str, passes: int | str, n: int) -> None:
    job = _curve_jobs().get(key)
    running = job is not None and job.running

    @st.fragment(run_every=1.0 if running else None)
    def show() -> None:
        job = _curve_jobs().get(key)
        if job is not None:
            done, total = job.progress()
            if job.running:
                now = f"verifying n = {job.current}" if job.current is not None else "starting"
                left = job.seconds_left()
                left = "" if left is None else f", about {state.fmt_seconds(left)} left"
                st.progress(done / max(total, 1), text=f"Verify every n: {done} of {total} done, {now}{left} "
                                                       "(the n on the slider goes next)")
                st.button("Stop verifying every n", key="curve_stop", on_click=job.cancel, icon=":material/stop:")
            elif running:  # it finished since the page ran: redraw the page with the new answers
                st.rerun()
            if job.error:
                st.warning(f"Verify every n stopped: {job.error}", icon=":material/warning:")
        ns = verified_ns(analysis, passes)
        mark = ", ".join(map(str, ns)) if ns else "none yet"
        st.caption(f"**Verified** (checked by forward passes) at n = {mark}; every other n shows the **one-pass** "
                   f"answer (the analysis alone)." + ("" if n in ns else f" n = {n} is not verified yet."))

    show()


# ----------------------------------------------------------------------------------------------
# display


def passes_text(sel: Any) -> str:
    """The search's new passes, of the budget in sets when it counts sets, + the confirmation's."""
    v = sel.verification or {}
    conf = v.get("confirm") or {}
    race = v.get("race") or {}
    of = "" if race.get("unit_budget") else f" of {v.get('budget', '?')}"
    return f"{sel.forward_passes - (conf.get('passes') or 0)}{of}" + (f" + {conf['passes']}" if conf.get("passes") else "")


def _blocks(removed: Any) -> str:
    return ", ".join(map(str, removed)) if removed else "-"


def verified_section(sel: Any, n: int) -> None:
    """The verified answer: winner, proposer, passes, one-pass answer and gap, every candidate."""
    v = sel.verification or {}
    gap = v.get("one_pass_gap_nats")
    ratio = v.get("one_pass_ppl_ratio")
    m = st.columns(5)
    m[0].metric("Verified answer removes", _blocks(sel.removed),
                help=f"Verification NLL {sel.nll:.4f} nats/token (perplexity {math.exp(sel.nll):.2f} on the "
                     "verification tokens).")
    m[1].metric("Winner proposed by", proposer_label(sel.winner_source),
                help="The first criterion that proposed the winning set (all of them are in the table).")
    conf = v.get("confirm") or {}
    m[2].metric("Forward passes", passes_text(sel),
                help=f"New passes this search spent (+ the confirmation's on fresh tokens, beyond the budget); "
                     "sets measured before cost none. Dense passes this time: "
                     f"{v.get('dense_passes', 0)} (its hidden states are cached, each candidate's pass starts "
                     f"at its first removed block). {len(sel.candidates)} of {v.get('candidates_proposed', '?')} "
                     "proposed sets scored.")
    m[3].metric("One-pass answer removes", _blocks(sel.one_pass_removed),
                help=None if sel.one_pass_nll is None else f"Verification NLL {sel.one_pass_nll:.4f}"
                + (one_pass_estimate(v) or "") + ".")
    m[4].metric("One-pass gap", "-" if gap is None else f"{gap:+.4f} nats",
                help="One-pass NLL minus the winner's (0 = verification kept the one-pass answer)"
                     + ("" if ratio is None else f"; perplexity ratio x{ratio:.3f}."))
    dense = v.get("dense_nll")
    race = v.get("race") or {}
    if race.get("units") is not None:
        budget = (f" of a budget of {race['unit_budget']:,} ({budget_text(v.get('budget_rule', '?'))} x the units of "
                  "a full pass)" if race.get("unit_budget") else f" ({len(sel.candidates)} sets, the budget in sets)")
        st.caption(f"Raced: {race.get('dropped', 0)} sets dropped before their last verification sample (their NLL "
                   f"is the paired estimate; 'samples' in the table), {race['units']:,} token-block units{budget}, "
                   f"against {race.get('units_unraced', 0):,} unraced. " + race.get("rule", "") + ".")
    st.caption(f"{sel.forward_passes} new forward passes, {v.get('dense_passes', 0)} dense pass"
               + ("" if dense is None else f" (dense NLL {dense:.4f})")
               + f", {state.fmt_seconds(sel.seconds)}. Winner: blocks {_blocks(sel.removed)} from "
               f"{proposer_label(sel.winner_source)}; the one-pass answer {_blocks(sel.one_pass_removed)} "
               + ("was kept." if gap is not None and gap == 0 else
                  ("was not scored." if gap is None else f"loses by {gap:.4f} nats per token."))
               + ("" if not conf else " " + describe_confirmation(conf)))
    note = stop_note(v)
    if note:
        st.caption(note + (" Raise the pass budget above to search further." if race.get("mode") == "units" else
                           " Race 'units' above spends what the race saves on a longer search (about the unraced "
                           "cost), or raise the pass budget."))
    left, right = st.columns([3, 2], gap="large")
    with left:
        table(tables.verified_candidates_frame(sel), f"verified_candidates_n{n}", "verify_candidates",
              "Every set the search scored, in order: proposers (first = the one that counts; FBS pool = a "
              "prune pool FBS visited, MI exact optimum (cost), k-th best = the k-th best set under that run "
              "cost, exchange / swap from = local search from that set, put back = a step of an exchange), "
              "MI objective, verification NLL and exp(NLL); cached = measured before, free.")
    with right:
        chart(viz.candidates_figure(sel), "verify_candidates_chart",
              "Best set on the left. Vermillion: the winner; light: sets found by exchanging or swapping blocks of "
              "the best one; circled: the one-pass answer. The dotted line is the unpruned model.")
