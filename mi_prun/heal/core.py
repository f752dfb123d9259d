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
with it except the folded weights, which are new tensors. Forward passes stop after the last block
they need; hooks (`mi_prun.models.hooks`) live only on private views and are removed on exit.
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
from mi_prun.config import HealConfig
from mi_prun.data import Calibration
from mi_prun.errors import MiPrunError
from mi_prun.heal.fit import BridgeStats, solve, unexplained
from mi_prun.heal.folds import HealRefused, Site, apply, fold_for, site
from mi_prun.models.blocks import find_blocks, input_device
from mi_prun.models.hooks import hidden_of, output_hooks, run_until_stop
from mi_prun.models.surgery import _validate_remove, prune_info, pruned_view
from mi_prun.progress import Progress
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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["removed"] = list(self.removed)
        out["runs"] = [asdict(r) for r in self.runs]
        return out


def _run(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, modules: dict[str, nn.Module],
         stop: nn.Module) -> dict[str, torch.Tensor]:
    """The output of each of `modules` on one batch; the pass ends after `stop`."""
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, output: Any) -> None:
        out[name] = hidden_of(output).clone()  # some families (Falcon) add to it in place

    device = input_device(model)
    with output_hooks(modules, keep, stop=stop):
        run_until_stop(model, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    missing = [name for name in modules if name not in out]
    if missing:
        raise HealRefused(f"cannot heal {type(model).__name__}: the forward pass never ran "
                          f"{', '.join(missing)} (the family table does not match this model).")
    return out


def _holdout_period(cfg: HealConfig, n_samples: int) -> int:
    """Every period-th calibration sample is held out (0: none)."""
    if cfg.ridge is not None or cfg.holdout <= 0:
        return 0
    period = max(2, round(1 / cfg.holdout))
    return period if n_samples >= period else 0


def heal_calibration(loaded: Any, config: HealConfig | None = None) -> Calibration:
    """The calibration tokens of `config` for `loaded`'s tokenizer (a `LoadedModel`)."""
    from mi_prun.data import calibration_tokens, load_text
    from mi_prun.models.blocks import context_length

    cfg = config or HealConfig()
    limit = context_length(loaded.model.config)
    if isinstance(limit, int) and cfg.seq_len > limit:
        raise MiPrunError(f"{cfg.seq_len} healing tokens per sample exceed the context of {loaded.spec} "
                          f"({limit} tokens). Fix: use at most {limit}.")
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
    cfg = config or HealConfig()
    if not isinstance(cfg, HealConfig):
        raise MiPrunError(f"config must be a HealConfig, got {type(cfg).__name__}.")
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
    dense = pruned_view(model, [])  # hooks go on a private view, never on the caller's model
    dense_blocks, healed_blocks = find_blocks(dense).blocks, find_blocks(healed).blocks
    ids, mask = calib.input_ids, calib.attention_mask
    n_samples = int(ids.shape[0])
    period = _holdout_period(cfg, n_samples)
    runs = runs_of(rem)
    n_steps = len(runs) * ((n_samples + cfg.batch_size - 1) // cfg.batch_size)
    records: list[RunHealing] = []
    step = 0
    for r, (start, end) in enumerate(runs):
        t_run = time.perf_counter()
        target = site(healed, blocks.path, kept.index(start - 1), fold)
        # The first run's inputs are the dense model's; later ones see the healed prefix.
        on_dense = not cfg.sequential or r == 0
        src: Site = site(dense, blocks.path, start - 1, fold) if on_dense else target
        src_block = dense_blocks[start - 1] if on_dense else healed_blocks[kept.index(start - 1)]
        train: BridgeStats | None = None
        hold: BridgeStats | None = None
        with torch.no_grad():
            for b0 in range(0, n_samples, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, n_samples)
                rows = choose_positions(mask[b0:b1], int(mask[b0:b1].numel()), cfg.drop_first, 0)
                t_mod = dense_blocks[end - 1]
                if on_dense:
                    got = _run(dense, ids[b0:b1], mask[b0:b1], {"m": src.module, "h": src_block, "t": t_mod},
                               stop=t_mod)
                else:
                    got = _run(dense, ids[b0:b1], mask[b0:b1], {"t": t_mod}, stop=t_mod)
                    got.update(_run(healed, ids[b0:b1], mask[b0:b1], {"m": src.module, "h": src_block},
                                    stop=src_block))
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
                    progress("heal", step / n_steps, f"run {start}-{end - 1}: batch {b1}/{n_samples}")
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
        apply(target, bridge.T, bridge.c)
        rec = RunHealing(start=start, end=end, fold_block=start - 1, module=target.name, kind=target.fold.kind,
                         ridge=ridge, ridge_abs=bridge.ridge_abs, ridge_choice=how,
                         holdout_unexplained=scores, unexplained_unhealed=unexplained(both, None),
                         unexplained_healed=unexplained(both, bridge), rows=both.n,
                         seconds=time.perf_counter() - t_run)
        log.info("healed run %d-%d into %s: unexplained %.4f -> %.4f (ridge %s, %s)", start, end - 1,
                 target.name, rec.unexplained_unhealed, rec.unexplained_healed, ridge, how)
        records.append(rec)
    cfg_record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    calibration = {**calib.provenance, "drop_first": cfg.drop_first, "holdout_every": period or None}
    healing = Healing(n_blocks=L, removed=rem, runs=tuple(records), config=cfg_record,
                      calibration=calibration, seconds=time.perf_counter() - t_all)
    setattr(healed, HEAL_INFO_ATTR, healing)
    return healed, healing


def healing_of(model: nn.Module) -> Healing | None:
    """The healing record of a model made by `heal`, else None."""
    info = getattr(model, HEAL_INFO_ATTR, None)
    return info if isinstance(info, Healing) else None
