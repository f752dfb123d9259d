"""The analysis pipeline as one call: text -> tokens -> capture -> estimator -> scores -> `Analysis`.

The CLI, the app and the benchmarks all call `analyze`; each stage reports through one progress
callback `progress(stage, fraction, message)` with stage in {load, capture, score}.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mi_prun import defaults
from mi_prun.capture import Capture, Progress, capture
from mi_prun.data import Calibration, calibration_tokens, load_text
from mi_prun.errors import MiPrunError
from mi_prun.models import LoadedModel
from mi_prun.report import Analysis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisConfig:
    """Every choice that decides an analysis; validated on construction.

    Defaults are the ones the quality benchmark chose (benchmarks/RESULTS.md).
    """

    calib: str = "builtin"
    n_samples: int = 32
    seq_len: int = 256
    max_positions: int = 4096
    drop_first: bool = defaults.DROP_FIRST
    estimator: str = defaults.ESTIMATOR
    estimator_options: dict[str, Any] = field(default_factory=lambda: dict(defaults.ESTIMATOR_OPTIONS))
    batch_size: int = 8
    seed: int = 0
    dpi_tol: float = 0.05
    n_groups: int = 8

    def __post_init__(self) -> None:
        for name in ("n_samples", "seq_len", "max_positions", "batch_size", "n_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MiPrunError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise MiPrunError(f"seed must be an integer in [0, 2^63), got {self.seed!r}.")
        if self.seq_len < 2:
            raise MiPrunError(f"tokens per sample must be at least 2, got {self.seq_len}.")
        if self.dpi_tol < 0:
            raise MiPrunError(f"DPI tolerance must be >= 0, got {self.dpi_tol}.")


def check_context(loaded: LoadedModel, seq_len: int) -> None:
    """Refuse sequences longer than the model's context window."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or \
        getattr(loaded.model.config, "n_positions", None)
    if isinstance(limit, int) and seq_len > limit:
        raise MiPrunError(f"{seq_len} tokens per sample exceed the context of {loaded.spec} ({limit} tokens). "
                          f"Fix: use at most {limit}.")


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
    from mi_prun.estimators import get_estimator
    from mi_prun.scores import score_capture

    estimator = get_estimator(cfg.estimator, **cfg.estimator_options)
    t0 = time.perf_counter()
    parts = score_capture(cap.hidden, cap.sample_index, estimator, dpi_tol=cfg.dpi_tol,
                          n_groups=cfg.n_groups, seed=cfg.seed, progress=progress)
    stage_timings = dict(timings or {})
    stage_timings.update({f"score_{k}": v for k, v in parts.pop("timings", {}).items()})
    stage_timings["capture"] = cap.seconds
    stage_timings["score"] = time.perf_counter() - t0
    calibration = {**calib.provenance, **cap.info()}
    return Analysis(model=loaded.describe(), calibration=calibration, estimator=estimator.name,
                    estimator_options=dict(estimator.options), timings=stage_timings, **parts)


def analyze(loaded: LoadedModel, cfg: AnalysisConfig | None = None,
            progress: Progress | None = None) -> Analysis:
    """Capture and score: the whole analysis of one model on one calibration set."""
    cfg = cfg or AnalysisConfig()
    t0 = time.perf_counter()
    calib = prepare_calibration(loaded, cfg)
    t_tok = time.perf_counter() - t0
    cap = run_capture(loaded, calib, cfg, progress=progress)
    analysis = analysis_from_capture(loaded, calib, cap, cfg, progress=progress,
                                     timings={"tokenize": t_tok, "load_model": loaded.load_seconds})
    analysis.timings["total"] = time.perf_counter() - t0
    del cap
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return analysis
