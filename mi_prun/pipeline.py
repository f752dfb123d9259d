"""The analysis pipeline as one call: text -> tokens -> capture -> estimator -> scores -> `Analysis`.

The CLI, the app and the benchmarks all call `analyze`; each stage reports through one progress
callback `progress(stage, fraction, message)` with stage in {load, capture, score}.
"""

from __future__ import annotations

import logging
import time

import torch

from mi_prun.capture import Capture, capture
from mi_prun.config import AnalysisConfig, expect_config
from mi_prun.data import Calibration, calibration_tokens, load_text
from mi_prun.estimators import get_estimator
from mi_prun.runtime import LoadedModel
from mi_prun.models.accept import as_loaded
from mi_prun.models.blocks import check_context as check_model_context
from mi_prun.runtime.sources import check_runnable
from mi_prun.models.memory import peak_memory
from mi_prun.progress import Progress
from mi_prun.results import Analysis
from mi_prun.scores import score_capture, span_unexplained

log = logging.getLogger(__name__)


def check_analysis_config(cfg: AnalysisConfig) -> AnalysisConfig:
    """`cfg` with its estimator name and options checked against the registry (one line naming the
    valid choices otherwise): the checks a config, being plain data, cannot make itself."""
    expect_config(cfg, AnalysisConfig)
    get_estimator(cfg.estimator, **cfg.estimator_options)
    return cfg


def check_context(loaded: LoadedModel, seq_len: int) -> None:
    """Refuse sequences longer than the model's context window (`models.blocks.check_context`)."""
    check_model_context(loaded, seq_len, "tokens per sample")


def prepare_calibration(loaded: LoadedModel, cfg: AnalysisConfig) -> Calibration:
    """The calibration token batches of `cfg` for `loaded`'s tokenizer."""
    check_context(loaded, cfg.seq_len)
    text = load_text(cfg.calib, purpose="calibration")
    return calibration_tokens(loaded.tokenizer, text, cfg.n_samples, cfg.seq_len, seed=cfg.seed)


def run_capture(loaded: LoadedModel, calib: Calibration, cfg: AnalysisConfig,
                progress: Progress | None = None) -> Capture:
    return capture(loaded.model, calib.input_ids, calib.attention_mask, max_positions=cfg.max_positions,
                   drop_first=cfg.drop_first, seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)


def analysis_from_capture(loaded: LoadedModel, calib: Calibration, cap: Capture, cfg: AnalysisConfig,
                          progress: Progress | None = None, timings: dict | None = None) -> Analysis:
    """Score a capture with the configured estimator and wrap everything as an `Analysis`."""
    estimator = get_estimator(cfg.estimator, **cfg.estimator_options)
    notes = []
    noisy = estimator.check_samples(int(cap.hidden.shape[1]), int(cap.hidden.shape[2]))  # refuses too few
    if noisy:
        notes.append(noisy)
    t0 = time.perf_counter()
    parts = score_capture(cap.hidden, cap.sample_index, estimator, dpi_tol=cfg.dpi_tol,
                          n_groups=cfg.n_groups, seed=cfg.seed, progress=progress)
    t_lin = time.perf_counter()
    parts["span_unexplained"] = span_unexplained(cap.hidden)  # for the linear-unexplained run cost
    stage_timings = dict(timings or {})
    stage_timings.update({f"score_{k}": v for k, v in parts.pop("timings", {}).items()})
    stage_timings["score_span_unexplained"] = time.perf_counter() - t_lin
    stage_timings["capture"] = cap.seconds
    stage_timings["score"] = time.perf_counter() - t0
    calibration = {**calib.provenance, **cap.info()}
    return Analysis(model=loaded.describe(), calibration=calibration, estimator=estimator.name,
                    estimator_options=dict(estimator.options), timings=stage_timings, notes=notes,
                    **parts)


def resources(loaded: LoadedModel) -> dict:
    """What a result records of the run's cost: peak memory (process RSS, CUDA) and whether the
    blocks streamed (`offload`), and where the weights really were (`weights`: resident, streamed or
    dispatched; `weights_at`: the device, "disk" / "cpu" for a streamed model, the devices of
    accelerate's map)."""
    where = loaded.weights.describe()
    return {**peak_memory(), "offload": bool(where["streamed"]), "weights": where["weights"],
            "weights_at": where["weights_at"], "device": str(loaded.device)}


def analyze(loaded: LoadedModel, cfg: AnalysisConfig | None = None,
            progress: Progress | None = None) -> Analysis:
    """Capture and score: the whole analysis of one model on one calibration set.

    `timings` holds seconds per stage; "total" covers tokenising, capture and scoring, and the
    model's load time is reported apart as "load_model"."""
    loaded = as_loaded(loaded, "analyze")
    check_runnable(loaded.model, f"the model {loaded.spec}")  # what runs is what the analysis reports
    cfg = check_analysis_config(AnalysisConfig() if cfg is None else cfg)
    t0 = time.perf_counter()
    calib = prepare_calibration(loaded, cfg)
    t_tok = time.perf_counter() - t0
    cap = run_capture(loaded, calib, cfg, progress=progress)
    analysis = analysis_from_capture(loaded, calib, cap, cfg, progress=progress,
                                     timings={"tokenize": t_tok, "load_model": loaded.load_seconds})
    # "total": tokenize + capture + score, i.e. the analysis itself; the model load is "load_model".
    analysis.timings["total"] = time.perf_counter() - t0
    analysis.resources = resources(loaded)
    del cap
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return analysis
