"""Typed, validated configs whose field defaults are the shipped defaults: the one source of truth.

Every library function that takes one of these settings defaults to the field below, and the CLI
and the app build the same configs, so a library call with default arguments gives the same answer
as `mi-prun` and the app. The numbers behind each default are in benchmarks/RESULTS.md, with the
command that produced them (`python benchmarks/quality.py ...` on smollm2-135m, WikiText-2).

Analysis (`AnalysisConfig`):
- gaussian-channel MI (mean over channels of -1/2 log(1 - rho^2)) with the estimator's own default
  preprocessing (none: a correlation does not see per-channel centring or scaling): the only
  estimator family whose rankings put the middle blocks first; the kernel Renyi estimator ranks the
  last blocks as redundant and wrecks the model.
- the first position of each sample is dropped: it carries the attention-sink activations.

Selection (`SelectConfig`):
- Fast-Block-Select on the span cost -log NMI(h_i, h_j): runs are judged by their own span MI (the
  DPI part of the method); its sets gave lower perplexity than the exact optimum of the same
  objective at n = 4, 8 and 10 (equal at 6).
- the first and last 10 % of blocks are protected: their removal costs far more perplexity than
  their MI suggests.
- ratio 0.25 when neither n nor ratio is given.
- verification (when a model is at hand): the `auto` budget, a quarter of the forward passes
  SLEB-style greedy removal spends for the same n (at least 8), on 16 x 256 calibration tokens
  kept apart from the capture's: the verified suite of benchmarks/RESULTS.md (`python
  benchmarks/quality.py --suite verified ...`) and its token-count measurement
  (`python benchmarks/verification_size.py ...`).
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from mi_prun.errors import MiPrunError

DPI_TOL: tuple[float, float] = (0.05, 0.05)  # (rtol, atol in nats) for DPI violation reports


# ---------------------------------------------------------------------------------------- checks

def expect_config(value: Any, cls: type, what: str = "config") -> Any:
    """`value` when it is a `cls` (a frozen config of this module); else one line naming the
    fix, with a dict of settings spelled as the constructor call that takes them."""
    if isinstance(value, cls):
        return value
    name = cls.__name__
    a = "an" if name[0] in "AEIOU" else "a"
    if isinstance(value, Mapping):
        call = ", ".join(f"{k}={v!r}" for k, v in value.items())
        raise MiPrunError(f"{what} must be {a} {name}, got a dict of settings. Fix: pass {name}({call}) "
                          f"(from mi_prun.config import {name}).")
    raise MiPrunError(f"{what} must be {a} {name}, got {type(value).__name__}. Fix: pass {name}(...) "
                      f"(from mi_prun.config import {name}).")


def calibration_spec(calibration: Mapping[str, Any]) -> str | None:
    """The `mi_prun.data.load_text` spec that reloads a calibration text from its provenance (an
    analysis's `calibration` dict), or None where it cannot be reloaded (text given inline)."""
    source = str(calibration.get("source") or "")
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith(("file:", "folder:")):
        return source.split(":", 1)[1]
    if source in ("wikitext2-valid", "wikitext2-valid-nounk", "wikitext2-tokenised", "wikitext2-test"):
        return source
    return None


def as_int(value: Any, name: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    """`value` as a Python int (numpy integers accepted; bools, floats and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MiPrunError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
    v = int(value)
    if minimum is not None and v < minimum:
        raise MiPrunError(f"{name} must be at least {minimum}, got {v}.")
    if maximum is not None and v > maximum:
        raise MiPrunError(f"{name} must be at most {maximum}, got {v}.")
    return v


def as_float(value: Any, name: str, low: float | None = None, high: float | None = None,
             open_low: bool = False, open_high: bool = False) -> float:
    """`value` as a finite float within the bounds (numpy numbers accepted; bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MiPrunError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v):
        raise MiPrunError(f"{name} must be a finite number, got {value!r}.")
    if low is not None and (v < low or (open_low and v == low)):
        raise MiPrunError(f"{name} must be {'>' if open_low else '>='} {low}, got {v}.")
    if high is not None and (v > high or (open_high and v == high)):
        raise MiPrunError(f"{name} must be {'<' if open_high else '<='} {high}, got {v}.")
    return v


def as_path(value: Any, name: str) -> str:
    """A str or os.PathLike as a str; anything else refused."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes) or not isinstance(value, str) or not value.strip():
        raise MiPrunError(f"{name} must be a non-empty path or name, got {value!r}.")
    return value


def check_protect_ends(value: Any) -> bool | int | float:
    """False/True, a block count >= 0, or a fraction in (0, 0.5)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return as_int(value, "protect_ends", minimum=0)
    if isinstance(value, numbers.Real) and 0.0 < float(value) < 0.5:
        return float(value)
    raise MiPrunError(f"protect_ends must be a bool, a block count or a fraction in (0, 0.5); got {value!r}.")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


# ---------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class AnalysisConfig:
    """Every choice that decides an analysis; validated on construction.

    `estimator_options` are passed to the estimator; empty means the estimator's own defaults
    (`mi-prun estimators` lists them). `dpi_tol` is (rtol, atol) or one number for both.
    """

    calib: str = "builtin"
    n_samples: int = 32
    seq_len: int = 256
    max_positions: int = 4096
    drop_first: bool = True
    estimator: str = "gaussian-channel"
    estimator_options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    seed: int = 0
    dpi_tol: float | tuple[float, float] = DPI_TOL
    n_groups: int = 8

    def __post_init__(self) -> None:
        _set(self, "calib", as_path(self.calib, "calib"))
        for name, label, low in (("n_samples", "calibration samples", 1), ("seq_len", "tokens per sample", 2),
                                 ("max_positions", "positions", 1), ("batch_size", "batch size", 1),
                                 ("n_groups", "stability groups", 2)):
            _set(self, name, as_int(getattr(self, name), label, minimum=low))
        _set(self, "seed", as_int(self.seed, "seed", minimum=0, maximum=2**63 - 1))
        if not isinstance(self.drop_first, bool):
            raise MiPrunError(f"drop_first must be True or False, got {self.drop_first!r}.")
        if not isinstance(self.estimator, str):
            raise MiPrunError(f"estimator must be a name, got {self.estimator!r}.")
        if not isinstance(self.estimator_options, Mapping):
            raise MiPrunError(f"estimator_options must be a mapping of option names to values (e.g. "
                              f"{{'preprocess': 'rms'}}), got {self.estimator_options!r}.")
        _set(self, "estimator_options", dict(self.estimator_options))
        tol = self.dpi_tol
        pair = (tol, tol) if isinstance(tol, numbers.Real) else tol
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise MiPrunError(f"dpi_tol must be a number or (rtol, atol), got {tol!r}.")
        _set(self, "dpi_tol", tuple(as_float(v, "DPI tolerance", low=0.0) for v in pair))
        # The estimator's name and options are checked against the registry by
        # `mi_prun.pipeline.check_analysis_config` (configs are plain data: types and ranges only).

    def replace(self, **changes: Any) -> "AnalysisConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class SelectConfig:
    """How blocks are chosen from an analysis; validated on construction.

    Give `n` (blocks to remove) or `ratio` (fraction of the L blocks, rounded half up); with
    neither, `ratio` = 0.25. `options` are the method's own options (e.g. fbs: pool, k, max_iter;
    see `mi-prun select --help`).

    `verify_passes` lets an MI selector's answer be checked when a model is at hand: candidate
    sets from every one-pass criterion, then local moves, are scored by the pruned view's NLL on
    `verify_samples` x `verify_seq_len` calibration tokens kept apart from the capture's, with at
    most `verify_budget(n, removable)` forward passes (see `mi_prun.select.verify`). "auto" (the
    default) allows a quarter of what SLEB-style greedy removal spends for the same n and model
    (n L' - n (n - 1) / 2 passes over the L' removable blocks), so the budget grows with the model
    and with n; an int is a fixed budget; 0 gives the one-pass answer.

    `verify_on` chooses what the passes score (`mi_prun.select.task_scorer`): None, the default,
    the calibration text apart from the capture's samples; a text source (as `calib` takes) for
    `verify_samples` x `verify_seq_len` tokens of another text; a multiple-choice task YAML (lm-eval's
    format, the [eval] extra) for its mean choice NLL over `verify_items` items (None: all).

    `verify_race` races the sets (`mi_prun.select.race`): each is scored on groups of
    `verify_race_group` verification samples and dropped once it trails the best set by more than
    a paired t bound at error rate `verify_race_alpha` per comparison (Bonferroni over the looks).
    "units": the budget is spent in token-block units (tokens x blocks run), "auto" or a number of
    passes times the mean units of a full pass of the proposed candidates, so what racing saves buys
    more exchanges and swaps for the same cost; "sets", the default: the budget counts sets as
    without racing (the same search, each set cheaper: on smollm2-135m and Gemma 3 270M it chose the
    unraced search's set at every n measured for 0.32-0.84 of its token-block units; "units" spent
    0.49-1.20 of "off"'s, chose the same set on 8 of 9 rows and a set of half the test perplexity on
    Gemma at n = 6, where the budget binds; benchmarks/RESULTS.md, race_bench.py). Whether the search
    converged or its budget ran out is recorded (`verification["stopped"]`, `select.stop_note`).
    "off": no racing, the search as before racing existed. A scorer that cannot race (a task's)
    runs unraced.
    """

    method: str = "fbs"
    run_cost: str = "neg-log-nmi"
    protect_ends: bool | int | float = 0.1
    n: int | None = None
    ratio: float | None = None
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    verify_passes: int | str = "auto"
    verify_samples: int = 16  # 16 x 256 tokens: measured by benchmarks/verification_size.py (RESULTS.md)
    verify_seq_len: int = 256
    verify_on: str | None = None  # None: the calibration text; else a text source or a task YAML (task_scorer)
    verify_items: int | None = None  # a task's items scored per set (None: all)
    # finalists of the verified search; those within CONFIRM_Z paired SE of the winner are re-scored on a
    # fresh draw of tokens (select/confirm.py); 0: off
    verify_confirm: int = 3
    # "units", "sets" or "off" (class docstring, mi_prun/select/race.py); chosen by benchmarks/race_bench.py
    verify_race: str = "sets"
    verify_race_alpha: float = 0.05  # a set at least as good as the best is dropped at most this often
    verify_race_group: int = 4  # verification samples per group (the scorer's batch size when racing)

    DEFAULT_RATIO = 0.25
    AUTO = "auto"
    # "auto" budget: SLEB-style greedy passes for the same n, divided by this, and at least
    # AUTO_MIN_PASSES (never more than SLEB's own passes: for small problems that is an exhaustive scan).
    AUTO_SLEB_FRACTION = 4
    AUTO_MIN_PASSES = 8
    # A runner-up is within the verification draw's noise when its NLL gap to the winner is below this
    # many paired standard errors over the samples (the usual 95 % two-sided level, not a fitted value).
    CONFIRM_Z = 2.0
    RACE_MODES = ("units", "sets", "off")
    # no set is dropped on fewer samples: a paired standard error from 3 differences is too unsteady
    RACE_MIN_SAMPLES = 4
    # when a raced set may be dropped: "doubling" (4, 8 of 16 samples) or "every" group (4, 8, 12);
    # chosen by benchmarks/race_looks.py (mi_prun/select/race.py)
    RACE_LOOKS = "doubling"
    # how a stage's sets are raced: "field" (every first look first, then best-looking first) or
    # "sequence" (one by one in the search's order); chosen by benchmarks/race_looks.py
    RACE_ORDER = "field"

    def __post_init__(self) -> None:
        # Names are checked against the registries where they are looked up (`mi_prun.select`):
        # configs are plain data, types and ranges only.
        for name in ("method", "run_cost"):
            if not isinstance(getattr(self, name), str):
                raise MiPrunError(f"{name} must be a name, got {getattr(self, name)!r}.")
        _set(self, "protect_ends", check_protect_ends(self.protect_ends))
        if self.n is not None and self.ratio is not None:
            raise MiPrunError(f"give n or ratio, not both (got n={self.n!r}, ratio={self.ratio!r}).")
        if self.n is not None:
            _set(self, "n", as_int(self.n, "n (blocks to remove)", minimum=1))
        if self.ratio is not None:
            _set(self, "ratio", as_float(self.ratio, "ratio", 0.0, 1.0, open_low=True, open_high=True))
        _set(self, "seed", as_int(self.seed, "seed", minimum=0, maximum=2**63 - 1))
        if not (isinstance(self.verify_passes, str) and self.verify_passes.strip().lower() == self.AUTO):
            _set(self, "verify_passes", as_int(self.verify_passes, "verify_passes (\"auto\", or a number of "
                                               "passes; 0 = one-pass answer)", minimum=0))
        else:
            _set(self, "verify_passes", self.AUTO)
        _set(self, "verify_samples", as_int(self.verify_samples, "verification samples", minimum=1))
        _set(self, "verify_seq_len", as_int(self.verify_seq_len, "verification tokens per sample", minimum=2))
        if self.verify_on is not None:
            spec = as_path(self.verify_on, "verify_on (a text source or a task YAML)").strip()
            _set(self, "verify_on", spec or None)
        if self.verify_items is not None:
            _set(self, "verify_items", as_int(self.verify_items, "verification task items", minimum=1))
        _set(self, "verify_confirm", as_int(self.verify_confirm, "verify_confirm (finalists confirmed on fresh "
                                            "tokens; 0 = off)", minimum=0))
        race = self.verify_race.strip().lower() if isinstance(self.verify_race, str) else self.verify_race
        if race is False:
            race = "off"
        if race not in self.RACE_MODES:
            raise MiPrunError(f"verify_race must be one of {', '.join(self.RACE_MODES)}, got {self.verify_race!r}. "
                              "Fix: units (race, budget in token-block units), sets (race, budget in sets) or off.")
        _set(self, "verify_race", race)
        _set(self, "verify_race_alpha", as_float(self.verify_race_alpha, "verify_race_alpha (error rate of a "
                                                 "race's drop)", 0.0, 0.5, open_low=True, open_high=True))
        _set(self, "verify_race_group", as_int(self.verify_race_group, "verify_race_group (samples per group)",
                                               minimum=1))
        if not isinstance(self.options, Mapping):
            raise MiPrunError(f"options must be a mapping, got {self.options!r}.")
        _set(self, "options", dict(self.options))

    @property
    def count(self) -> dict[str, Any]:
        """{"n": ...} or {"ratio": ...}: what `resolve_n` gets (the default ratio when neither)."""
        if self.n is not None:
            return {"n": self.n}
        return {"ratio": self.ratio if self.ratio is not None else self.DEFAULT_RATIO}

    @property
    def verifies(self) -> bool:
        """Whether the answer is checked by forward passes when a model is at hand."""
        return self.verify_passes != 0

    def verify_budget(self, n: int, removable: int) -> int:
        """Forward passes the verified search may spend to remove `n` of `removable` blocks: the
        fixed `verify_passes`, or with "auto" floor(SLEB's passes / AUTO_SLEB_FRACTION), but at least
        min(AUTO_MIN_PASSES, SLEB's passes), SLEB's passes being n L' - n (n - 1) / 2 (one pass per
        remaining block per step). SmolLM2-135M (24 removable blocks): 8, 11, 22, 32, 41, 48 passes
        for n = 1, 2, 4, 6, 8, 10."""
        if self.verify_passes != self.AUTO:
            return int(self.verify_passes)
        n, removable = int(n), int(removable)
        sleb = max(1, n * removable - n * (n - 1) // 2)
        return max(sleb // self.AUTO_SLEB_FRACTION, min(self.AUTO_MIN_PASSES, sleb))

    @classmethod
    def for_healing(cls, **changes: Any) -> "SelectConfig":
        """The shipped selection when the removed runs will be healed (`mi_prun.heal`, `prune
        --heal`): the one-pass Fast-Block-Select answer (`verify_passes` 0), whose contiguous runs
        a linear bridge replaces. On smollm2-135m calibrated on the tokenised WikiText-2 release it
        healed best (geometric mean 81.5 over n = 2..10 against 87.7 for the verified answer +
        bridge); calibrated on the validation text without `<unk>` (the default) the verified
        answer heals better (92.0 against 109.5) and the one-pass answer's bridges worsen the model
        at n = 8 and 10 (benchmarks/RESULTS.md, "Healing"). Check a healed model with `eval`."""
        return cls(**{"verify_passes": 0, **changes})

    def replace(self, **changes: Any) -> "SelectConfig":
        if "n" in changes and changes["n"] is not None:
            changes.setdefault("ratio", None)
        if "ratio" in changes and changes["ratio"] is not None:
            changes.setdefault("n", None)
        return replace(self, **changes)


@dataclass(frozen=True)
class EvalConfig:
    """The perplexity protocol: non-overlapping windows of `seq_len` tokens of `data`, at most
    `max_windows` of them (None: all), BOS per window when the tokenizer uses one.

    `EvalConfig.quick()` is the short protocol the app uses for interactive curves."""

    data: str = "wikitext2"
    seq_len: int = 256
    max_windows: int | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        _set(self, "data", as_path(self.data, "evaluation data"))
        _set(self, "seq_len", as_int(self.seq_len, "seq_len", minimum=2))
        if self.max_windows is not None:
            _set(self, "max_windows", as_int(self.max_windows, "max_windows", minimum=1))
        _set(self, "batch_size", as_int(self.batch_size, "batch size", minimum=1))

    @classmethod
    def quick(cls, **changes: Any) -> "EvalConfig":
        return cls(**{"seq_len": 128, "max_windows": 8, **changes})


def _is_shard_size(value: Any) -> bool:
    """A size `save_pretrained` reads (transformers' `convert_file_size_to_int`): a positive int of
    bytes, or a whole number with a unit KB, MB, GB (Kb, Mb, Gb: bits), KiB, MiB or GiB."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return int(value) > 0
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)", value, flags=re.IGNORECASE) if isinstance(value, str) else None
    return match is not None and int(match.group(1)) > 0


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot accuracy through lm-evaluation-harness (`mi_prun.zeroshot`).

    `tasks`: lm-eval task names (their datasets cached, or reachable), task YAML files, or folders
    of them, as a sequence or one comma-separated string. `limit`: at most that many items per task
    (None: all). `num_fewshot`: examples in each prompt (0: zero-shot, the block-pruning papers'
    protocol). `batch_size`: requests per forward pass."""

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    num_fewshot: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        tasks = self.tasks
        if isinstance(tasks, (str, os.PathLike)):
            tasks = os.fspath(tasks).split(",")
        if not isinstance(tasks, (tuple, list)):
            raise MiPrunError(f"tasks must be task names or YAML paths, got {tasks!r}.")
        _set(self, "tasks", tuple(t for t in (as_path(t, "task").strip() for t in tasks) if t))
        if self.limit is not None:
            _set(self, "limit", as_int(self.limit, "limit (items per task)", minimum=1))
        _set(self, "num_fewshot", as_int(self.num_fewshot, "num_fewshot", minimum=0))
        _set(self, "batch_size", as_int(self.batch_size, "batch size", minimum=1))

    def replace(self, **changes: Any) -> "ZeroShotConfig":
        return replace(self, **changes)


EXPORT_FORMATS = ("safetensors", "gguf")
GGUF_FOLD_TYPES = ("f32", "f16", "q8_0")


@dataclass(frozen=True)
class ExportConfig:
    """How a pruned model is written. `overwrite` replaces only an earlier mi-prun export (see
    `mi_prun.files`); `force` exports even when the analysis was made on another model with the
    same block count; `max_shard_size` is passed to `save_pretrained`. `format`: "safetensors" (a
    folder plain transformers loads) or "gguf" (`model.gguf` made from the GGUF file the model was read
    from, its quantisation kept: `mi_prun.gguf_export`); `gguf_fold_type`: the precision of a healed,
    folded tensor in a GGUF export ("f16", the default: within 0.003 of the float32 logits on smollm2-135m; "f32":
    exact; "q8_0": smallest; see benchmarks/RESULTS.md)."""

    overwrite: bool = False
    force: bool = False
    max_shard_size: str = "5GB"
    format: str = "safetensors"
    gguf_fold_type: str = "f16"

    def __post_init__(self) -> None:
        for name in ("overwrite", "force"):
            if not isinstance(getattr(self, name), bool):
                raise MiPrunError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.format not in EXPORT_FORMATS:
            raise MiPrunError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}.")
        if self.gguf_fold_type not in GGUF_FOLD_TYPES:
            raise MiPrunError(f"gguf_fold_type must be one of {', '.join(GGUF_FOLD_TYPES)}, got "
                              f"{self.gguf_fold_type!r}.")
        if not _is_shard_size(self.max_shard_size):
            raise MiPrunError(f"max_shard_size must be a size such as '5GB', '500MB' or '2GiB' (or a number "
                              f"of bytes), got {self.max_shard_size!r}.")


# A relative ridge past this only shrinks a bridge to zero; larger ones overflow in float64.
MAX_RIDGE = 1e6


@dataclass(frozen=True)
class ExecutionConfig:
    """Where the model's weights live while it runs (`mi_prun.runtime.load_model`).

    `stream`: mi-prun's block streaming: True keeps the weights in their safetensors files on disk (or
    in CPU memory) and moves one block at a time to the compute device (`mi_prun.runtime.sources`);
    False keeps the whole model on the device; "auto" streams only when the memory check says the
    model does not fit. `device_map` and `offload_folder` are accelerate's own options, named as
    accelerate names them: its placement over several devices ("auto", "balanced", "sequential", a
    device name, or a {module: device} dict / JSON file), and the folder for the weights it offloads
    to disk. Streaming and a device map are alternatives."""

    stream: bool | str = "auto"
    device_map: str | dict | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if not any(self.stream is c for c in (True, False)) and self.stream != "auto":
            raise MiPrunError(f"stream must be True, False or 'auto', got {self.stream!r}.")
        if self.stream is True and self.device_map is not None:
            raise MiPrunError("streaming blocks and a device map are alternatives. Fix: give one of "
                              "--stream and --device-map.")
        if self.offload_folder is not None:
            if self.device_map is None:
                raise MiPrunError("offload_folder (--offload-folder) is accelerate's folder for the weights a device "
                                  "map puts on disk, and no device map is given"
                                  + (" (--stream reads the weights from their own files)" if self.stream is True else "")
                                  + ". Fix: add --device-map (e.g. auto), or drop --offload-folder.")
            _set(self, "offload_folder", as_path(self.offload_folder, "offload folder"))


@dataclass(frozen=True)
class HealConfig:
    """How removed runs are bridged (`mi_prun.heal`); validated on construction.

    Calibration: `n_samples` x `seq_len` tokens of `calib` (drawn with `seed`), `batch_size`
    samples per forward pass, each sample's first position dropped when `drop_first` (the
    attention sink). `ridge`: the ridge lambda relative to the mean diagonal of M^T M (the
    bridge's Gram matrix); None chooses it per run from `ridge_grid` by the fit residual on the
    held-out fraction `holdout` of the calibration samples (no extra forward pass), falling back
    to `default_ridge` when too few samples are left to hold out. `sequential`: fit each run on
    the model as pruned and healed so far (later fits see the inputs they will get), else every
    run on the dense model's activations. `check`: keep a run's bridge only when it lowers the
    next-token NLL of the held-out samples (the bridge fitted without them, against the same model
    without that bridge); a bridge that does not help is left out, and the record says so.
    """

    calib: str = AnalysisConfig.calib
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    drop_first: bool = True
    ridge: float | None = None
    ridge_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    default_ridge: float = 1e-3
    holdout: float = 0.25
    sequential: bool = True
    check: bool = True

    def __post_init__(self) -> None:
        _set(self, "calib", as_path(self.calib, "healing calibration"))
        for name, label, low in (("n_samples", "healing calibration samples", 1),
                                 ("seq_len", "healing tokens per sample", 2),
                                 ("batch_size", "healing batch size", 1)):
            _set(self, name, as_int(getattr(self, name), label, minimum=low))
        _set(self, "seed", as_int(self.seed, "seed", minimum=0, maximum=2**63 - 1))
        for name in ("drop_first", "sequential", "check"):
            if not isinstance(getattr(self, name), bool):
                raise MiPrunError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.ridge is not None:
            _set(self, "ridge", as_float(self.ridge, "ridge (relative lambda)", low=0.0, high=MAX_RIDGE))
        grid = self.ridge_grid
        if isinstance(grid, (str, bytes)) or not isinstance(grid, (tuple, list)) or not grid:
            raise MiPrunError(f"ridge_grid must be a non-empty list of numbers, got {grid!r}.")
        _set(self, "ridge_grid", tuple(as_float(v, "ridge_grid value", low=0.0, high=MAX_RIDGE) for v in grid))
        _set(self, "default_ridge", as_float(self.default_ridge, "default_ridge", low=0.0, high=MAX_RIDGE))
        # every k-th sample is held out (k >= 2), so at most half: 0.99 would silently mean 0.5
        _set(self, "holdout", as_float(self.holdout, "holdout fraction (every k-th sample, k >= 2)", 0.0, 0.5))

    def replace(self, **changes: Any) -> "HealConfig":
        return replace(self, **changes)

    @classmethod
    def for_analysis(cls, analysis: Any = None, **changes: Any) -> "HealConfig":
        """Healing calibrated like the analysis: its text, sample count and length, seed and
        first-position choice, from an `AnalysisConfig` or an analysis's `calibration`
        provenance (an `Analysis` or its dict). Where the text cannot be reloaded (given inline as
        `text:...`), the defaults; `changes` override either."""
        kw: dict[str, Any] = {}
        if isinstance(analysis, AnalysisConfig):
            kw = {"calib": analysis.calib, "n_samples": analysis.n_samples, "seq_len": analysis.seq_len,
                  "seed": analysis.seed, "batch_size": analysis.batch_size, "drop_first": analysis.drop_first}
        else:
            c = getattr(analysis, "calibration", analysis)
            if isinstance(c, Mapping) and calibration_spec(dict(c)) is not None:
                kw = {"calib": calibration_spec(dict(c)), "n_samples": int(c.get("n_samples", cls.n_samples)),
                      "seq_len": int(c.get("seq_len", cls.seq_len)), "seed": int(c.get("seed", cls.seed)),
                      "drop_first": bool(c.get("drop_first", cls.drop_first))}
        return cls(**{**kw, **changes})


__all__ = ["AnalysisConfig", "DPI_TOL", "calibration_spec", "EvalConfig", "ExecutionConfig",
           "ExportConfig", "HealConfig", "MAX_RIDGE", "SelectConfig", "ZeroShotConfig", "as_float",
           "as_int", "as_path", "check_protect_ends"]
