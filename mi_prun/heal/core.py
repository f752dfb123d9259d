"""`heal`: remove blocks and bridge every removed run with a closed-form linear map in the weights.

For a removed run i..j-1 with block i-1 kept: m is the output of block i-1's fold module (its MLP
output projection, see `folds`), y = h_i - m the rest of block i-1's output, and the bridge fits
m T + c ~ r = h_j - y over calibration tokens, so that block i-1 then emits y + m T + c ~ h_j,
what the removed run used to hand to block j. h_j comes from the dense model. With
`HealConfig.sequential` the runs are fitted in order on the model as pruned and healed so far, so
each fit sees the inputs it will get (and absorbs the error left by earlier runs). Sums stream
over calibration batches in float64 (`fit.BridgeStats`); padding and, with `drop_first`, each
sample's first position (the attention sink) are left out.

The model passed in is never modified: the healed model is a `pruned_view` sharing every tensor
with it except the folded weights, which are new tensors. Every pass runs through the one block runner
(`mi_prun.runtime`), whatever holds the weights, and stops after the last block it needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mi_prun.capture import choose_positions
from mi_prun.config import HealConfig, expect_config
from mi_prun.data import Calibration, calibration_tokens, load_text
from mi_prun.errors import MiPrunError
from mi_prun.evaluate import token_nll
from mi_prun.heal.fit import BridgeStats, solve, unexplained
from mi_prun.heal.folds import HealRefused, Site, apply, fold_for, site
from mi_prun.models.accept import as_module, check_token_ids
from mi_prun.models.blocks import check_context, find_blocks
from mi_prun.models.surgery import _validate_remove, prune_info, pruned_view
from mi_prun.progress import Progress
from mi_prun.runtime.runner import BlockRunner
from mi_prun.runtime.sources import weight_source
from mi_prun.select.costs import runs_of

log = logging.getLogger(__name__)

# The attribute a healed model carries so that `export` records the healing.
HEAL_INFO_ATTR = "_mi_prun_healing"


@dataclass(frozen=True)
class RunHealing:
    """One bridged run: blocks start..end-1 removed (original numbering, from 0), folded into
    `module` of block start-1. `unexplained_*`: squared error at h_end as a fraction of h_end's
    variance on all calibration rows, for the pruned model without a bridge and with it."""

    start: int
    end: int
    fold_block: int
    module: str
    kind: str  # "linear" (full d x d map) or "norm" (per-channel scale)
    ridge: float
    ridge_abs: float
    ridge_choice: str  # "fixed", "held-out" or "default"
    holdout_unexplained: dict[str, float]
    unexplained_unhealed: float
    unexplained_healed: float
    rows: int
    seconds: float
    kept: bool = True  # False: the check found the bridge did not lower held-out NLL, so it was left out
    holdout_nll: dict[str, float] = field(default_factory=dict)  # {"without": ..., "with": ...} (HealConfig.check)


@dataclass(frozen=True)
class Healing:
    """What `heal` did: the runs bridged, the settings and the calibration, for `mi_prun.json`."""

    n_blocks: int
    removed: tuple[int, ...]
    runs: tuple[RunHealing, ...]
    config: dict[str, Any]
    calibration: dict[str, Any]
    seconds: float
    method: str = "closed-form linear bridge folded into the block before each removed run"
    notes: list[str] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)  # the held-out NLL check (HealConfig.check)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["removed"] = list(self.removed)
        out["runs"] = [asdict(r) for r in self.runs]
        return out


class _Activations:
    """The activations heal needs, from the one block runner (`mi_prun.runtime`) over every
    calibration batch, whatever holds the weights. The dense pass continues where the previous run's
    stopped; the healed pass from the input of the block that was folded last (a fold changes that
    block's output, never its input)."""

    def __init__(self, dense: nn.Module, healed: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                 batch_size: int, fold_path: str) -> None:
        self.dense = BlockRunner(dense, ids, mask, batch_size)
        self.healed = BlockRunner(healed, ids, mask, batch_size)
        self.fold_path = fold_path
        self.dense_at, self.dense_h = 0, self.dense.h0  # the input of block dense_at
        self.healed_at, self.healed_h = 0, self.healed.h0

    def _advance_dense(self, stop: int) -> list[torch.Tensor]:
        self.dense_h = self.dense.last(self.dense_h, self.dense_at, stop=stop)
        self.dense_at = stop
        return self.dense_h

    def outputs(self, start: int, end: int, healed_index: int, on_dense: bool) -> dict[str, list[torch.Tensor]]:
        """{"m": fold module output of block start-1, "h": its output, "t": dense h_end} per batch."""
        out: dict[str, list[torch.Tensor]] = {}
        if on_dense:
            h = self.dense.last(self._advance_dense(start - 1), start - 1, stop=start, taps={start - 1: self.fold_path})
            out["m"], out["h"] = self.dense.tapped.pop(start - 1), h
            self.dense_h, self.dense_at = h, start
        out["t"] = self._advance_dense(end)
        if not on_dense:
            self.healed_h = self.healed.last(self.healed_h, self.healed_at, stop=healed_index)
            self.healed_at = healed_index
            h = self.healed.last(self.healed_h, healed_index, stop=healed_index + 1, taps={healed_index: self.fold_path})
            out["m"], out["h"] = self.healed.tapped.pop(healed_index), h
        return out


def _install(view: nn.Module, target: Site, bridge: Any, replaced: list[str]) -> None:
    """Fold `bridge` into the target module (new tensors, which the weight source then serves)."""
    apply(target, bridge.T, bridge.c)
    weight_source(view).replaced(view, target.name, replaced)


def _restore(view: nn.Module, target: Site, saved: dict[str, torch.Tensor], replaced: list[str]) -> None:
    """Put the target module's tensors from before `_install` back."""
    for pname, value in saved.items():
        target.module._parameters[pname] = value
    weight_source(view).replaced(view, target.name, [p for p in replaced if p in saved])


def _held_out_nll(model: nn.Module, held: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> float:
    """Mean next-token NLL of `model` on the held-out samples."""
    total, count = token_nll(model, held[0], held[1], batch_size=batch_size)
    return total / max(count, 1)


def _holdout_period(cfg: HealConfig, n_samples: int) -> int:
    """Every period-th calibration sample is held out (0: none): to choose the ridge, and for the
    check."""
    if cfg.holdout <= 0 or (cfg.ridge is not None and not cfg.check):
        return 0
    period = max(2, round(1 / cfg.holdout))
    return period if n_samples >= period else 0


def heal_calibration(loaded: Any, config: HealConfig | None = None) -> Calibration:
    """The calibration tokens of `config` for `loaded`'s tokenizer (a `LoadedModel`)."""
    cfg = expect_config(config if config is not None else HealConfig(), HealConfig)
    check_context(loaded, cfg.seq_len, "healing tokens per sample")
    text = load_text(cfg.calib, purpose="calibration")
    return calibration_tokens(loaded.tokenizer, text, cfg.n_samples, cfg.seq_len, seed=cfg.seed)


def check_healable(model: nn.Module, removed: Iterable[int]) -> None:
    """Refuse (`HealRefused`, one line) before any work when some run cannot be folded exactly."""
    blocks = find_blocks(model)
    rem = _validate_remove(removed, len(blocks))
    fold = fold_for(model)
    kept = [b for b in range(len(blocks)) if b not in rem]
    view = pruned_view(model, rem)
    for start, end in runs_of(rem):
        if start == 0:
            raise HealRefused(f"cannot heal the run of blocks 0..{end - 1}: it starts at block 0, so no kept "
                              "block before it can carry the bridge (folding into the embeddings is not "
                              "supported; keep block 0).")
        site(view, blocks.path, kept.index(start - 1), fold)


def heal(model: nn.Module, removed: Iterable[int], calib: Calibration, *, config: HealConfig | None = None,
         progress: Progress | None = None) -> tuple[nn.Module, Healing]:
    """`model` without blocks `removed` (numbered from 0), each removed run bridged; and the record.

    `calib`: calibration tokens (`mi_prun.data.Calibration`, e.g. from `heal_calibration`).
    The healed model shares every tensor with `model` except the folded weights; `model` is
    unchanged. Raises `HealRefused` (one line, before any forward pass) where a run cannot be
    folded exactly. `progress("heal", fraction, message)` after every batch.
    """
    cfg = expect_config(config if config is not None else HealConfig(), HealConfig)
    model = as_module(model)
    if not hasattr(calib, "input_ids"):
        raise MiPrunError(f"calib must be calibration tokens, got {type(calib).__name__}. Fix: pass "
                          "mi_prun.heal.heal_calibration(loaded, config) or mi_prun.data.calibration_tokens(...).")
    check_token_ids(calib.input_ids, model, "calib.input_ids")
    if prune_info(model) is not None:
        raise MiPrunError("heal the original model, not a pruned one: healing needs the removed blocks' "
                          "outputs as targets. Fix: pass the unpruned model and all blocks to remove.")
    if model.training:
        log.warning("healing a model in training mode: dropout makes the fit noisy")
    t_all = time.perf_counter()
    blocks = find_blocks(model)
    L = len(blocks)
    rem = _validate_remove(removed, L)
    check_healable(model, rem)
    fold = fold_for(model)
    kept = [b for b in range(L) if b not in rem]
    healed = pruned_view(model, rem)
    dense = model  # the runner works on a private weight-sharing copy, never on the caller's model
    ids, mask = calib.input_ids, calib.attention_mask
    n_samples = int(ids.shape[0])
    period = _holdout_period(cfg, n_samples)
    runs = runs_of(rem)
    n_steps = len(runs) * ((n_samples + cfg.batch_size - 1) // cfg.batch_size)
    acts = _Activations(dense, healed, ids, mask, cfg.batch_size, fold.path)
    records: list[RunHealing] = []
    step = 0
    held_idx = [i for i in range(n_samples) if period and i % period == period - 1] if cfg.check else []
    held = (ids[held_idx], mask[held_idx]) if held_idx else None
    if progress:
        progress("heal", 0.0, f"0 of {n_steps} batches ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    for r, (start, end) in enumerate(runs):
        t_run = time.perf_counter()
        target = site(healed, blocks.path, kept.index(start - 1), fold)
        # The first run's inputs are the dense model's; later ones see the healed prefix.
        on_dense = not cfg.sequential or r == 0
        train: BridgeStats | None = None
        hold: BridgeStats | None = None
        got_all = acts.outputs(start, end, kept.index(start - 1), on_dense)
        with torch.no_grad():
            for k_batch, b0 in enumerate(range(0, n_samples, cfg.batch_size)):
                b1 = min(b0 + cfg.batch_size, n_samples)
                rows = choose_positions(mask[b0:b1], int(mask[b0:b1].numel()), cfg.drop_first, 0)
                got = {key: value[k_batch] for key, value in got_all.items()}
                s_idx, p_idx = rows[:, 0], rows[:, 1]
                # (B, T, d) views: some families (OPT) run their MLP on (B*T, d) rows.
                m, h, t = (got[k].reshape(b1 - b0, ids.shape[1], -1)[s_idx.to(got[k].device),
                                                                     p_idx.to(got[k].device)]
                           for k in ("m", "h", "t"))
                r_target = t - (h - m)  # what m should be so that block start-1 emits h_end
                if train is None:
                    train = BridgeStats(m.shape[-1], target.diagonal, m.device)
                    hold = BridgeStats(m.shape[-1], target.diagonal, m.device)
                is_hold = ((s_idx + b0) % period == period - 1) if period else torch.zeros_like(s_idx, dtype=torch.bool)
                is_hold = is_hold.to(m.device)
                train.add(m[~is_hold], r_target[~is_hold], t[~is_hold])
                hold.add(m[is_hold], r_target[is_hold], t[is_hold])
                step += 1
                if progress:
                    progress("heal", step / n_steps, f"batch {step} of {n_steps} (run {start}-{end - 1}: "
                             f"{b1}/{n_samples} samples)")
        assert train is not None and hold is not None
        scores: dict[str, float] = {}
        if cfg.ridge is not None:
            ridge, how = cfg.ridge, "fixed"
        elif train.n and hold.n:
            scores = {repr(g): unexplained(hold, solve(train, g, target.intercept)) for g in cfg.ridge_grid}
            ridge, how = min(cfg.ridge_grid, key=lambda g: (scores[repr(g)], -g)), "held-out"
        else:
            ridge, how = cfg.default_ridge, "default"
        both = train + hold
        bridge = solve(both, ridge, target.intercept)
        offloaded = weight_source(healed).materialize(healed, target.name)  # real tensors to fold into
        verdict: dict[str, float] = {}
        if held is not None and hold.n:  # the check: the bridge fitted without the held-out samples, on them
            saved = {p: getattr(target.module, p) for p in ("weight", "bias")
                     if isinstance(getattr(target.module, p, None), torch.Tensor)}
            if progress:
                progress("heal", step / n_steps, f"checking the bridge of run {start}-{end - 1} on "
                         f"{held[0].shape[0]} held-out samples")
            verdict["without"] = _held_out_nll(healed, held, cfg.batch_size)
            # accelerate's offload hook puts an offloaded module's tensors back on `meta` after each
            # forward: give the module its real tensors again before every fold
            _restore(healed, target, saved, offloaded)
            _install(healed, target, solve(train, ridge, target.intercept), offloaded)
            verdict["with"] = _held_out_nll(healed, held, cfg.batch_size)
            _restore(healed, target, saved, offloaded)
        use = not verdict or verdict["with"] < verdict["without"]
        if use:
            _install(healed, target, bridge, offloaded)
        rec = RunHealing(start=start, end=end, fold_block=start - 1, module=target.name, kind=target.fold.kind,
                         ridge=ridge, ridge_abs=bridge.ridge_abs, ridge_choice=how,
                         holdout_unexplained=scores, unexplained_unhealed=unexplained(both, None),
                         unexplained_healed=unexplained(both, bridge), rows=both.n,
                         seconds=time.perf_counter() - t_run, kept=use, holdout_nll=verdict)
        if use:
            log.info("healed run %d-%d into %s: unexplained %.4f -> %.4f (ridge %s, %s)", start, end - 1,
                     target.name, rec.unexplained_unhealed, rec.unexplained_healed, ridge, how)
        else:
            log.warning("run %d-%d left unbridged: its bridge raised the held-out NLL %.4f -> %.4f", start, end - 1,
                        verdict["without"], verdict["with"])
        records.append(rec)
    cfg_record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    calibration = {**calib.provenance, "drop_first": cfg.drop_first, "holdout_every": period or None}
    if not cfg.check:
        check: dict[str, Any] = {"run": False}
    elif held is None:
        check = {"run": False, "note": f"no held-out samples ({n_samples} calibration samples, holdout "
                                       f"{cfg.holdout:g}): every bridge kept unchecked"}
    else:
        check = {"run": True, "held_out_samples": len(held_idx),
                 "rule": "a run's bridge (fitted without the held-out samples) is kept only when it lowers their "
                         "next-token NLL against the same model without it",
                 "dropped": [[r.start, r.end - 1] for r in records if not r.kept]}
    notes = [f"run {r.start}-{r.end - 1} left unbridged: its bridge raised the held-out NLL "
             f"{r.holdout_nll['without']:.4f} -> {r.holdout_nll['with']:.4f}" for r in records if not r.kept]
    healing = Healing(n_blocks=L, removed=rem, runs=tuple(records), config=cfg_record,
                      calibration=calibration, seconds=time.perf_counter() - t_all, notes=notes, check=check)
    setattr(healed, HEAL_INFO_ATTR, healing)
    return healed, healing


def healing_of(model: nn.Module) -> Healing | None:
    """The healing record of a model made by `heal`, else None."""
    info = getattr(model, HEAL_INFO_ATTR, None)
    return info if isinstance(info, Healing) else None
