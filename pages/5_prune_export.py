"""Prune and export: the model as a column of blocks per method, perplexity on demand (cached per
removed set) and a perplexity-against-blocks-removed curve, unhealed and healed, a generation sample
before and after, parameter count and speed, and export (healed or not) to a folder and as a
downloadable archive. MI-PRUN's selection is the library's default: verified by forward passes
(for the current n only) unless the user picks the one-pass answer."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from mi_prun.config import EXPORT_FORMATS, ExportConfig, SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun.speed import compare_speed, model_size
from mi_prun.export import export
from mi_prun.gguf_export import GGUF_FILE
from mi_prun.heal import HealRefused
from mi_prun.models import ZOO, pruned_view
from mi_prun.progress import TimeLeft
from mi_prun_app import accuracy, healing, search, state, tables, viz
from mi_prun_app.labels import proposer_label
from mi_prun_app.ui import (
    COMPARE_METHODS,
    chart,
    generate,
    model_for,
    n_slider,
    ppl,
    ppl_protocol_short,
    ppl_protocol_text,
    require_analysis,
    selection,
    show_error,
    table,
)

DEFAULT_METHOD = SelectConfig.method

analysis = require_analysis()
L = analysis.n_blocks
st.title("Prune and export")
n = n_slider(analysis)
passes = search.search_controls()
st.caption(f"Removing **{state.ratio_text(n, L)}**. "
           "Pruning never touches the shared model: every pruned model here is a view that shares its "
           "weights and leaves the original intact.")

methods = st.multiselect("Methods to compare", list(COMPARE_METHODS),
                         default=[m for m in COMPARE_METHODS if m != "topk"], key="pr_methods",
                         format_func=viz.label, persist_state="session")
verify_area = st.container()
try:
    sels = {m: selection(analysis, m, n) for m in methods}
except MiPrunError as exc:
    show_error(exc)
    st.stop()
verified = None
if passes and (DEFAULT_METHOD in methods or not methods):
    verified = search.verified(analysis, DEFAULT_METHOD, n, passes, verify_area)
    if verified is None:
        with verify_area:
            search.notice(DEFAULT_METHOD, n, passes)
with verify_area:
    search.curve_controls(analysis, passes, n)


def chosen(method: str, k: int = n):
    """The selection this page uses for `method` at k blocks: MI-PRUN's verified one where this
    session has it (the current n is verified above; other n are never verified here); with
    healing on, MI-PRUN's one-pass answer, the library's default for healing
    (`SelectConfig.for_healing()`: its contiguous runs are the ones a bridge replaces best)."""
    if method == DEFAULT_METHOD and passes and not st.session_state.get("pr_heal", False):
        found = verified if k == n else search.known_verified(DEFAULT_METHOD, k, passes)
        if found is not None:
            return found
    return sels[method] if k == n and method in sels else selection(analysis, method, k)


columns = {}
for m, s in sels.items():
    columns[m] = s.removed
    if m == DEFAULT_METHOD and verified is not None:
        columns[f"{m}|verified"] = verified.removed
left, right = st.columns([2, 3], gap="large")
with left:
    chart(viz.blocks_column_figure(L, columns), "blocks_column",
          "Each column is the model, block 0 at the bottom. Coloured squares are the blocks a method removes "
          "(diamonds: MI-PRUN's verified answer). MI-PRUN tends to remove runs of neighbouring blocks (judged "
          "by their span MI); per-block baselines may scatter their choice.")
    if verified is not None:
        st.caption(f"MI-PRUN verified removes {list(verified.removed)} (proposed by {proposer_label(verified.winner_source)}, "
                   f"{verified.forward_passes} new forward passes); its one-pass answer was "
                   f"{list(verified.one_pass_removed or [])}. Candidates and NLLs: *Fast-Block-Select* page.")

with right:
    st.subheader("Perplexity")
    heal_on = st.toggle("Heal with a linear bridge", key="pr_heal", persist_state="session",
                        help="Adds healed lines: " + healing.heal_text(analysis) + ". Export then writes the healed model.")
    refused: dict[str, list[str]] = {}
    if heal_on:
        try:
            for m in methods:
                why = healing.refusal(analysis, chosen(m).removed)
                if why:
                    refused.setdefault(why, []).append(viz.sel_label(m, chosen(m).verified))
        except MiPrunError as exc:
            show_error(exc)
        for why, who in refused.items():
            st.warning(f"{', '.join(who)}: {why}", icon=":material/healing:")
    st.caption(ppl_protocol_text() + ". Lower is better; each removed set is computed once and cached"
               + (" (healed: a few more forward passes per set to fit the bridges)." if heal_on else "."))
    points: list = st.session_state.setdefault("ppl_points", [])
    b1, b2 = st.columns(2)
    do_now = b1.button(f"Compute perplexity for n = {n}", key="ppl_now", icon=":material/calculate:")
    do_curve = b2.button(f"Fill the curve for n = 1..{n}", key="ppl_curve", icon=":material/show_chart:",
                         help="Perplexity of every method for each number of removed blocks up to n. MI-PRUN's "
                              "verified line gets points only at the n verified so far (this session's, or "
                              "'Verify every n'); no new passes.")
    dense = None
    if do_now or do_curve or points:
        skipped_heal: set[int] = set()
        try:
            with st.spinner("Perplexity of the dense model..."):
                dense = ppl(analysis, ())
            todo = [(m, k) for k in (range(1, n + 1) if do_curve else [n]) for m in methods] if (do_now or do_curve) else []
            bar = st.progress(0, text="perplexity") if todo else None
            left = TimeLeft()
            for t, (m, k) in enumerate(todo):
                s = chosen(m, k)
                bar.progress(int(100 * t / len(todo)), text=state.progress_text(
                    f"{viz.sel_label(m, s.verified)}, {k} blocks removed ({t + 1} of {len(todo)} points)",
                    left.update("perplexity", t / len(todo)), t / len(todo)))
                base = {"method": m, "n": k, "removed": " ".join(map(str, s.removed)), "verified": bool(s.verified)}
                for healed in ((False, True) if heal_on else (False,)):
                    try:
                        res = healing.healed_ppl(analysis, s.removed) if healed else ppl(analysis, s.removed)
                    except HealRefused:
                        skipped_heal.add(k)
                        continue
                    point = {**base, "healed": healed, "ppl": res["ppl"]}
                    if point not in points:
                        points.append(point)
            if bar is not None:
                bar.empty()
        except MiPrunError as exc:
            show_error(exc)
        if skipped_heal:
            st.caption(f"No healed point where the library refuses to heal (n = {sorted(skipped_heal)}).")
    if points:
        ns = sorted({int(p["n"]) for p in points})
        chart(viz.ppl_curve_figure(points, dense_ppl=dense["ppl"] if dense else None,
                                    protocol=ppl_protocol_short()), "ppl_curve_chart",
              (f"Only n = {ns[0]} is computed so far: each bar is a method (hatched: healed with a linear "
               "bridge) next to the unpruned model. Compute more n (\"Fill the curve\", or move the slider and "
               "compute again) to see a curve." if len(ns) == 1 else
               "Each line is a method; dashed lines are the same selections healed with a linear bridge, "
               "diamonds MI-PRUN's verified selection; the dotted line is the unpruned model. A flatter line "
               "keeps quality longer as blocks are removed; the gap between a solid and a dashed line is what "
               "healing recovers. Points are added as you explore (this session only)."))
        table(tables.ppl_frame(points), "perplexity", "ppl_table",
              ppl_protocol_text() + "; healed_ratio = healed / unhealed perplexity (below 1 = recovered).",
              missing="not computed (healing off for that point, or refused)")
    else:
        st.caption("Press a button to compute perplexity.")
    accuracy.section(analysis, n, {viz.sel_label(m, chosen(m).verified): chosen(m) for m in methods}, points)

st.divider()
c_gen, c_size = st.columns(2, gap="large")
export_method = st.session_state.get("pr_export_method", DEFAULT_METHOD)
export_method = export_method if export_method in sels else (methods[0] if methods else DEFAULT_METHOD)
with c_gen:
    st.subheader("Generation before and after")
    prompt = st.text_input("Prompt", value="The history of the city begins", key="pr_prompt",
                           persist_state="session")
    max_new = st.slider("New tokens", 8, 64, 24, key="pr_max_new", persist_state="session")
    if st.button("Generate", key="gen", icon=":material/edit_note:"):
        try:
            gen_sel = chosen(export_method)
            removed = gen_sel.removed
            with st.spinner("Generating (greedy)..."):
                before = generate(analysis, (), prompt, int(max_new))
                after = generate(analysis, removed, prompt, int(max_new))
            healed_text = None
            if heal_on and healing.refusal(analysis, removed) is None:
                healed_text = healing.healed_generation(analysis, removed, prompt, int(max_new))
            st.session_state["gen_result"] = {"prompt": prompt, "before": before, "after": after,
                                              "healed": healed_text, "method": export_method,
                                              "verified": bool(gen_sel.verified), "removed": list(removed)}
        except MiPrunError as exc:
            show_error(exc)
    g = st.session_state.get("gen_result")
    if g:
        who = viz.sel_label(g["method"], g.get("verified", False))
        st.markdown(f"**Dense:** {g['prompt']} *{g['before']}*")
        st.markdown(f"**{who} without blocks {g['removed']}:** {g['prompt']} *{g['after']}*")
        if g.get("healed") is not None:
            st.markdown(f"**{who}, healed:** {g['prompt']} *{g['healed']}*")
        st.caption("Greedy decoding. A pruned model that still continues the prompt sensibly has kept most "
                   "of its ability; fine-tuning after pruning usually recovers more.")

with c_size:
    st.subheader("Size and speed")
    try:
        loaded = model_for(analysis)
        removed = chosen(export_method).removed
        pruned = pruned_view(loaded.model, list(removed))
        dense_size, pruned_size = model_size(loaded.model), model_size(pruned)
        m = st.columns(2)
        m[0].metric("Parameters (dense)", f"{dense_size['parameters'] / 1e6:.2f} M")
        m[1].metric(f"Parameters ({viz.sel_label(export_method, chosen(export_method).verified)})", f"{pruned_size['parameters'] / 1e6:.2f} M",
                    delta=f"{100 * (pruned_size['parameters'] / dense_size['parameters'] - 1):.1f} %",
                    delta_color="off")
        if st.button("Measure speed", key="speed", icon=":material/speed:",
                     help="Prefill of 64 tokens and 16 decode steps, dense and pruned interleaved."):
            with st.spinner("Timing dense and pruned models..."):
                st.session_state["speed_result"] = compare_speed(loaded.model, pruned, loaded.tokenizer,
                                                          prompt_tokens=64, decode_tokens=16, repeats=2)
        sp = st.session_state.get("speed_result")
        if sp:
            rows = [{"model": k, "parameters": sp[k]["parameters"],
                     "prefill_tokens_per_s": sp[k]["prefill_tokens_per_s"],
                     "decode_tokens_per_s": sp[k]["decode_tokens_per_s"]} for k in ("dense", "pruned")]
            table(pd.DataFrame(rows), "speed", "speed_table",
                  f"Prefill speed-up x{sp['prefill_speedup']:.2f}, decode speed-up x{sp['decode_speedup']:.2f} "
                  f"on {sp['dense']['device']} (batch 1, median of {sp['repeats']} runs).")
    except MiPrunError as exc:
        show_error(exc)

st.divider()
st.subheader("Export")
root = state.export_root()
c1, c2, c3 = st.columns([1, 2, 1])
export_methods = methods or [DEFAULT_METHOD]
export_method = c1.selectbox("Method", export_methods, index=export_methods.index(export_method),
                             key="pr_export_method",
                             format_func=lambda m: viz.sel_label(m, m == DEFAULT_METHOD and verified is not None))
sel = chosen(export_method)
spec = analysis.model.get("spec") or "model"
name = c2.text_input(f"Folder name (inside {root})", value=state.default_export_name(spec, export_method, sel.removed),
                     key=f"pr_export_name_{export_method}_{n}",
                     help="A plain name: letters, digits, '.', '_' and '-'. Exports never leave the export folder.")
overwrite = c3.checkbox("Replace an existing export", value=ExportConfig().overwrite, key="pr_overwrite",
                        help="overwrite: replaces only an earlier mi-prun export of that name; a folder "
                             "holding anything else is never replaced.")
st.caption(f"Removes blocks {list(sel.removed)} (numbered from 0)"
           + (f", the verified answer ({sel.forward_passes} new forward passes)" if sel.verified else "")
           + ". The folder holds the model (safetensors, config, tokenizer), mi_prun.json (what was removed and "
           "why) and mergekit.yaml (rebuilds the same model from the original's Hugging Face id)."
           + (" Healing is on: the bridges are folded into the saved weights and recorded in mi_prun.json "
              "(mergekit.yaml rebuilds only the unhealed model)." if heal_on else ""))
from_gguf = str(spec).lower().endswith(".gguf") or spec in ZOO  # the built-in model is read from a GGUF too
fmt = (st.radio("Format", EXPORT_FORMATS, horizontal=True, key="pr_format",
                help="safetensors: a folder plain transformers loads (float32). gguf: model.gguf for llama.cpp, "
                     "the source GGUF's kept blocks copied in their original quantisation (healed weights in "
                     "float16), with mi_prun.json beside it.")
       if from_gguf else "safetensors")
if st.button("Export", type="primary", key="export", icon=":material/save:"):
    try:
        target = state.safe_export_path(name, root)
        loaded = model_for(analysis)
        model, record = (healing.healed_model(analysis, sel.removed) if heal_on
                         else (pruned_view(loaded.model, list(sel.removed)), None))
        with st.spinner(f"Writing {target}..."):
            out = export(model, loaded.tokenizer, sel, target, analysis=analysis, loaded=loaded,
                         config=ExportConfig(overwrite=bool(overwrite), format=fmt), healing=record,
                         inputs=[st.session_state.get("analysis_folder")])
        st.session_state["export_path"] = str(out)
        st.session_state["export_notes"] = list(record.notes) if record is not None else []
    except MiPrunError as exc:
        show_error(exc)

path = st.session_state.get("export_path")
if path and Path(path).is_dir():
    out = Path(path)
    st.success(f"Exported to {out}", icon=":material/check_circle:")
    for note in st.session_state.get("export_notes", []):  # healing's check: a bridge that did not help
        st.info(f"Healing: {note}; that run is removed without a bridge.", icon=":material/info:")
    d = st.columns(3)
    d[0].download_button("Download archive (.zip)", data=lambda: state.zip_folder(out), file_name=f"{out.name}.zip",
                         mime="application/zip", key="dl_zip", icon=":material/folder_zip:")
    report = (out / "mi_prun.json").read_text()
    d[1].download_button("mi_prun.json", data=report, file_name="mi_prun.json", mime="application/json",
                         key="dl_json", icon=":material/description:")
    if (out / GGUF_FILE).is_file():  # a GGUF export: no mergekit recipe, a file llama.cpp runs
        d[2].code(f"llama-cli -m {out / GGUF_FILE}", language="bash")
        with st.expander("The report"):
            st.json(json.loads(report), expanded=False)
    else:
        yaml_text = (out / "mergekit.yaml").read_text()
        d[2].download_button("mergekit.yaml", data=yaml_text, file_name="mergekit.yaml", mime="text/yaml",
                             key="dl_yaml", icon=":material/description:")
        with st.expander("mergekit.yaml and the report"):
            st.code(yaml_text, language="yaml")
            st.json(json.loads(report), expanded=False)
