"""The CLI's commands: each builds the library's configs from its flags, calls the library and
prints. No command knows a default or a rule of its own."""

from __future__ import annotations

import sys
from typing import Any

from mi_prun.cli.args import ANALYSIS_DESTS, HEAL_DESTS, SELECT_DESTS, given
from mi_prun.cli.output import TqdmProgress, format_analysis, format_compare, format_selection
from mi_prun.config import AnalysisConfig, EvalConfig, ExportConfig, HealConfig, SelectConfig, ZeroShotConfig
from mi_prun.data import check_text_source, load_text, verification_tokens
from mi_prun.errors import MiPrunError
from mi_prun.estimators import describe_estimators
from mi_prun.evaluate import evaluate, generate_sample
from mi_prun.export import export
from mi_prun.gguf_export import GGUF_FILE, check_gguf_export, check_gguf_spec
from mi_prun.files import ANALYSIS, EXPORT, check_output
from mi_prun.heal import check_healable, heal, heal_calibration
from mi_prun.models import prune
from mi_prun.runtime import load_model
from mi_prun.pipeline import analyze, check_analysis_config, prepare_calibration
from mi_prun.results import Analysis
from mi_prun.select import Selection, compare, get_selector, resolve_n, select, sleb_select
from mi_prun.select.confirm import FreshDrawError, fresh_tokens
from mi_prun.select.registry import VERIFIABLE
from mi_prun.select.task_scorer import is_task_spec
from mi_prun.zeroshot import build_tasks, load_stamped, record_zero_shot, zero_shot


def _load(args) -> Any:
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      trust_remote_code=args.trust_remote_code,
                      check_memory_first=not args.skip_memory_check, stream=args.stream,
                      offload_folder=args.offload_folder)


def analysis_config(args):
    return check_analysis_config(AnalysisConfig(
        calib=args.calib, n_samples=args.samples, seq_len=args.tokens, max_positions=args.positions,
        drop_first=not args.keep_first, estimator=args.estimator,
        estimator_options=args.estimator_options or {}, batch_size=args.batch_size, seed=args.seed))


def select_config(args):
    kw: dict[str, Any] = {"method": args.method, "run_cost": args.run_cost, "n": args.n, "ratio": args.ratio,
                          "verify_passes": args.verify_passes, "verify_samples": args.verify_samples,
                          "verify_seq_len": args.verify_tokens, "verify_on": args.verify_on,
                          "verify_items": args.verify_items, "verify_confirm": args.verify_confirm,
                          "verify_race": args.verify_race, "verify_race_alpha": args.verify_race_alpha}
    if args.protect_ends is not None:
        kw["protect_ends"] = args.protect_ends
    if getattr(args, "heal", False) and not given(args, {"verify_passes"}):
        return SelectConfig.for_healing(**{k: v for k, v in kw.items() if k != "verify_passes"})
    return SelectConfig(**kw)


def heal_config(args, acfg, calibration: dict | None = None):
    """The `HealConfig` of `prune --heal` (`HealConfig.for_analysis`: calibrated like the analysis
    run here, or like the saved one whose `calibration` provenance is given), then the --heal-*
    flags; None without --heal (and --heal-* flags refused)."""
    if not args.heal:
        _refuse_flags(args, HEAL_DESTS, "healing is off")
        return None
    changes = {name: getattr(args, flag) for flag, name in
               (("heal_calib", "calib"), ("heal_samples", "n_samples"), ("heal_ridge", "ridge"))
               if getattr(args, flag) is not None}
    return HealConfig.for_analysis(acfg if acfg is not None else calibration, **changes)


def _analyze(args, progress: TqdmProgress):
    cfg = analysis_config(args)  # settings are validated before the (slow) model load
    progress("load", 0.0, args.model)
    loaded = _load(args)
    progress("load", 1.0, f"{loaded.n_blocks} blocks")
    return loaded, analyze(loaded, cfg, progress=progress)


def _refuse_flags(args, dests: set[str], why: str) -> None:
    flags = given(args, dests)
    if flags:
        raise MiPrunError(f"{', '.join(flags)} would be ignored: {why}. Fix: drop "
                          f"{'it' if len(flags) == 1 else 'them'}.")


VERIFY_DESTS = {"verify_passes", "verify_samples", "verify_tokens", "verify_race", "verify_race_alpha"}


def _refuse_ignored_select_flags(args, cfg) -> None:
    """No flag of `select` (or `prune`) may be given and then silently not used
    (`--verify-passes 0`, which asks for no verification, is never refused)."""
    verify = VERIFY_DESTS if cfg.verifies else VERIFY_DESTS - {"verify_passes"}
    if getattr(args, "compare", False):
        _refuse_flags(args, {"model", "device", "dtype", "stream", "method"} | verify,
                      "--compare runs every one-pass method on the analysis, without the model")
    if getattr(args, "model", "") is None:  # select without --model
        _refuse_flags(args, {"device", "dtype", "stream"}, "no --model is given")
        _refuse_flags(args, verify, "verification runs the model, and no --model is given (add --model "
                      "to verify)")
    heal = getattr(args, "heal", False)
    if not cfg.verifies or cfg.method not in VERIFIABLE or getattr(args, "model", "") is None:
        why = ("no --model is given (add --model to verify)" if getattr(args, "model", "") is None else
               f"method {cfg.method} is not verified" if cfg.method not in VERIFIABLE else
               "--verify-passes 0 turns verification off" + (" (the default with --heal; give --verify-passes N "
                                                              "to verify)" if heal else ""))
        _refuse_flags(args, {"verify_on", "verify_items"}, f"--verify-on chooses what verification scores, and {why}")
    elif cfg.verify_on is None or not is_task_spec(cfg.verify_on):
        _refuse_flags(args, {"verify_items"}, "--verify-items counts the items of a --verify-on task, and "
                      + ("no --verify-on is given" if cfg.verify_on is None else f"{cfg.verify_on} is a text, not a task"))
    if cfg.method not in VERIFIABLE:
        needs_model = get_selector(cfg.method).needs_model
        # sleb and mi-guided search on the verification tokens themselves (prune's sleb: on calibration tokens)
        unused = verify if not needs_model or (args.command == "prune" and cfg.method == "sleb") \
            else verify & {"verify_passes"}
        _refuse_flags(args, unused, f"method {cfg.method} is not verified (only {', '.join(VERIFIABLE)} are)")
        if args.command == "select" and not needs_model:
            _refuse_flags(args, {"model", "device", "dtype"}, f"method {cfg.method} needs no model (only the "
                          f"verified methods {', '.join(VERIFIABLE)} run it)")


TEXT_FLAGS = (("calib", "--calib"), ("heal_calib", "--heal-calib"), ("data", "--data"), ("verify_on", "--verify-on"))


def _check_text_flags(args) -> None:
    """Every text source the command will read exists (nothing is read yet): a missing file is
    found before the model loads, not after the analysis and the selection."""
    for dest, flag in TEXT_FLAGS:
        value = getattr(args, dest, None)
        if value is not None and not (dest == "verify_on" and is_task_spec(str(value))):
            check_text_source(value, f"{flag} text")


def cmd_analyze(args) -> int:
    analysis_config(args)  # bad settings fail before anything else
    _check_text_flags(args)
    if args.out:
        check_output(args.out, ANALYSIS, args.overwrite, inputs=[args.model])
    progress = TqdmProgress(not args.quiet)
    _, analysis = _analyze(args, progress)
    progress.close()
    print(format_analysis(analysis))
    if args.out:
        path = analysis.save(args.out, overwrite=args.overwrite, inputs=[args.model])
        print(f"saved to {path}")
    return 0


def cmd_show(args) -> int:
    print(format_analysis(Analysis.load(args.folder)))
    return 0


def cmd_estimators(args) -> int:
    for row in describe_estimators():
        print(f"{row['name']}: {row['description']}")
        for opt, (default, text) in row["options"].items():
            print(f"    {opt} (default: {default!r}): {text}")
    return 0


def cmd_select(args) -> int:
    cfg = select_config(args)
    if args.out and args.compare:
        raise MiPrunError("--out writes one selection; --compare prints several. Fix: drop one of them.")
    _refuse_ignored_select_flags(args, cfg)
    _check_text_flags(args)
    analysis = Analysis.load(args.analysis)
    if args.compare:
        n = resolve_n(analysis.n_blocks, **cfg.count, protect_ends=cfg.protect_ends)
        rows = compare(analysis, config=cfg)
        print(format_compare(rows, n, analysis.n_blocks, cfg.run_cost))
        return 0
    loaded, progress = None, TqdmProgress(not args.quiet)
    if args.model is not None:
        loaded = _load(args)
        analysis.check_model(loaded.model, where=f"analysis {args.analysis}")
    sel = select(analysis, config=cfg, model=loaded, progress=progress)
    progress.close()
    print(format_selection(sel))
    if args.out:
        path = sel.save(args.out, overwrite=args.overwrite)
        print(f"selection written to {path} (use it with `mi-prun prune --selection {path}`)")
    return 0


def cmd_prune(args) -> int:
    if args.analysis and args.selection:
        raise MiPrunError("give --analysis or --selection, not both (a selection file records its analysis).")
    if args.analysis or args.selection:
        _refuse_flags(args, ANALYSIS_DESTS, "the analysis is read from "
                      + ("--analysis" if args.analysis else "--selection") + ", not run")
    if args.selection:
        _refuse_flags(args, SELECT_DESTS, "--selection already says which blocks to remove")
    export_cfg = ExportConfig(overwrite=args.overwrite, force=args.force, format=args.format)
    if export_cfg.format == "gguf":
        check_gguf_spec(args.model)  # before the slow work
    sel_cfg = None if args.selection else select_config(args)
    if sel_cfg is not None:
        _refuse_ignored_select_flags(args, sel_cfg)
    acfg = None if (args.analysis or args.selection) else analysis_config(args)
    check_output(args.out, EXPORT, args.overwrite, inputs=[args.model, args.analysis, args.selection])
    if args.sample and args.stream is True:
        raise MiPrunError("--sample generates text, which needs the model in memory, and --stream streams it. "
                          "Fix: drop one of them.")
    saved = Selection.load(args.selection) if args.selection else None
    analysis = Analysis.load(args.analysis) if args.analysis else None
    hcfg = heal_config(args, acfg, analysis.calibration if analysis is not None else
                       (saved.provenance.get("calibration") if saved is not None else None))
    _check_text_flags(args)
    progress = TqdmProgress(not args.quiet)
    if analysis is None and saved is None:
        loaded, analysis = _analyze(args, progress)
    else:
        loaded = _load(args)
    if saved is not None:
        saved.check_model(loaded.model, force=export_cfg.force, where=f"selection {args.selection}")
        sel = saved
    else:
        assert analysis is not None and sel_cfg is not None
        analysis.check_model(loaded.model, force=export_cfg.force,
                             where=f"analysis {args.analysis}" if args.analysis else "the analysis")
        if sel_cfg.method == "sleb":
            calib = prepare_calibration(loaded, acfg or analysis_config(args))
            sel = sleb_select(loaded.model, calib.input_ids, attention_mask=calib.attention_mask, config=sel_cfg,
                              analysis=analysis, progress=progress, force=export_cfg.force)
        else:
            tokens = fresh = None
            if acfg is not None and sel_cfg.verifies and sel_cfg.verify_on is None:
                # the analysis ran here: its text is at hand even when it cannot be reloaded (text:...)
                text = load_text(acfg.calib, purpose="calibration")
                tokens = verification_tokens(loaded.tokenizer, text, analysis.calibration, sel_cfg.verify_samples,
                                             sel_cfg.verify_seq_len).input_ids
                if sel_cfg.verify_confirm:
                    try:
                        fresh = fresh_tokens(sel_cfg, analysis, loaded.tokenizer, tokens, text=text)
                    except FreshDrawError as e:
                        print(f"note: the verified search is not confirmed: {e}", file=sys.stderr)
            sel = select(analysis, config=sel_cfg, model=loaded, tokens=tokens, progress=progress,
                         force=export_cfg.force, confirm_tokens=fresh)
    print(format_selection(sel))
    if export_cfg.format == "gguf":  # a removal the GGUF cannot express is refused before healing
        check_gguf_export(loaded, [b for b in range(loaded.n_blocks) if b not in set(sel.removed)])
    healing = None
    if hcfg is not None:

        check_healable(loaded.model, sel.removed)  # the one-line refusal, before any forward pass
        pruned, healing = heal(loaded.model, sel.removed, heal_calibration(loaded, hcfg), config=hcfg,
                               progress=progress)
        for run in (r for r in healing.runs if r.kept):
            check = (f"; held-out NLL {run.holdout_nll['without']:.4f} -> {run.holdout_nll['with']:.4f}"
                     if run.holdout_nll else "")
            print(f"healed blocks {run.start}-{run.end - 1} into {run.module}: unexplained variance at "
                  f"h_{run.end} {run.unexplained_unhealed:.4f} -> {run.unexplained_healed:.4f} "
                  f"(ridge {run.ridge:g}, {run.ridge_choice}){check}")
        for note in healing.notes:  # the runs the check left unbridged
            print(f"{note} (removed without healing)")
        if healing.check.get("note"):
            print(f"note: {healing.check['note']}", file=sys.stderr)
    else:
        pruned = prune(loaded.model, sel.removed)
    path = export(pruned, loaded.tokenizer, sel, args.out, analysis=analysis, loaded=loaded,
                  config=export_cfg, inputs=[args.model, args.analysis, args.selection], healing=healing)
    progress.close()
    if export_cfg.format == "gguf":
        print(f"exported to {path / GGUF_FILE} (run it with llama.cpp: llama-cli -m {str(path / GGUF_FILE)!r})")
    else:
        print(f"exported to {path} (load it with AutoModelForCausalLM.from_pretrained({str(path)!r}))")
    if args.sample:
        print("before:", generate_sample(loaded.model, loaded.tokenizer, args.sample))
        print("after: ", generate_sample(pruned, loaded.tokenizer, args.sample))
    return 0


def cmd_eval(args) -> int:
    cfg = EvalConfig(data=args.data, seq_len=args.seq_len, max_windows=args.max_windows,
                     batch_size=args.batch_size)
    _check_text_flags(args)
    zcfg = None
    if args.tasks is not None:
        zcfg = ZeroShotConfig(tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                              batch_size=args.batch_size)
        build_tasks(zcfg)  # an unknown task or a bad YAML fails before the (slow) model load
    else:
        _refuse_flags(args, {"limit", "num_fewshot"}, "no --tasks given")
    progress = TqdmProgress(not args.quiet)
    # the export evaluated is the one its accuracy is recorded into (another process may replace it)
    loaded, stamp = load_stamped(args.model, lambda: _load(args))
    res = evaluate(loaded.model, loaded.tokenizer, cfg, progress=progress)
    progress.close()
    print(f"perplexity {res.ppl:.3f} on {res.source}: seq_len {res.seq_len}, {res.windows} windows, "
          f"{res.tokens_scored} tokens scored, BOS {'prepended' if res.bos else 'not used'} ({res.protocol})")
    if zcfg is not None:
        zs = zero_shot(loaded, config=zcfg, progress=progress)
        progress.close()
        print(f"zero-shot accuracy (lm-eval {zs.lm_eval_version}, {zs.num_fewshot}-shot"
              f"{'' if zs.limit is None else f', at most {zs.limit} items per task'}):")
        print(zs.summary())
        if stamp is not None:  # an export when it was loaded
            path = record_zero_shot(args.model, zs, stamp=stamp)
            print(f"recorded in {path}")
    return 0


COMMANDS = {"analyze": cmd_analyze, "show": cmd_show, "estimators": cmd_estimators, "select": cmd_select,
            "prune": cmd_prune, "eval": cmd_eval}

__all__ = ["COMMANDS", "analysis_config", "select_config", "cmd_analyze", "cmd_eval", "cmd_estimators", "cmd_prune",
           "cmd_select", "cmd_show"]
