"""Racing: score a candidate set group by group and stop once it is clearly worse than the best set.

Why. The verified search scores every set it tries on all verification samples (16 x 256 tokens),
yet most sets trail the best one by many paired standard errors after a few samples: on
smollm2-135m a set of the exchange's trials typically loses by 0.1-1 nats per token against a
paired standard error of about 0.01. Racing stops spending on such a set; only contenders get every
sample, and the budget counts the work really done (token-block units), not sets.

The rule (`RaceRule`). The verification samples come in G groups (`RowScorer.groups`, one batch of
rows each), scored in order. A set may be dropped at the looks: with the shipped `schedule`
"doubling", after the first group that brings m >= `min_samples` samples, then after the first group
that doubles the samples of the look before, never after the last group (16 samples in groups of 4:
looks at 4 and 8); with "every", after every group but the last from `min_samples` on (4, 8, 12).
Fewer looks make each one's bound tighter (the Bonferroni split below), so more sets go at the
first look, and the few a look at 12 would drop are scored to the end: on smollm2-135m (n = 2-10),
Gemma 3 270M (2, 4, 6) and Qwen2.5-Coder-1.5B (4, 7) the doubling looks chose the same sets as every
group's, for 0.92-1.00 of their units on 9 rows and 1.04 on one (benchmarks/race_looks.py,
race_bench.py; RESULTS "Racing").
At a look with m samples in, let d_i = NLL_i(set) - NLL_i(incumbent) be the paired per-sample
differences (mean NLL per token of sample i; the incumbent is the best complete set so far, scored
on every sample). The set is dropped when

    mean(d) > t_{1 - alpha / K, m - 1} * sd(d) / sqrt(m),

a one-sided paired t test at level alpha / K, K being the number of looks the schedule and the
group sizes give (`RaceRule.looks`): Bonferroni over the looks.
Error rate: if the paired differences of a set and its incumbent are independent normal draws (the
verification samples are drawn at random from the text) and the set's expected NLL is no higher
than the incumbent's, the set is dropped with probability at most `alpha` (0.05 by default),
whatever the number of looks. That bounds each comparison, not the whole search; a set the race
drops may be re-raced later against another incumbent (a later n), which is a new comparison.
tests/test_race.py measures how often the race drops the set the full evaluation ranks best on
synthetic scorers with known means and noise, and holds it below `alpha`. A set whose partial NLL
is not finite is dropped at once (a broken pass never wins, as in the unraced search).

Order (`RaceRule.order`). A set is raced against the best complete set so far, so a set that beats a
weak incumbent is scored to the end, and so is every set within noise of one. Scored one by one in
the search's order ("sequence"), a stage whose best set comes late completes every improvement on
the way to it. The verified search scores stages whose sets are all known at once (the candidates,
an exchange's put-back sets, its trials), so with "field" (the default) every set of a stage first
runs its first look (work it is charged anyway: every raced set is scored at least that far), and
the sets are then raced best-looking first (`Race.field_order`: the lowest mean NLL on those common
samples): the set completed first is the stage's likely best, and the others race against it. The
rule of each comparison is unchanged; which sets complete, and so the units, change: the same sets
as one by one on 8 rows of smollm2-135m and Gemma 3 270M for 0.85-1.00 of the units, on
Qwen2.5-Coder-1.5B (n = 4, 7) for 0.81 and 0.80 (benchmarks/race_looks.py --orders, race_bench.py;
RESULTS "The race's order"). Swap moves (first improvement) stay one by one. A set's decision still
depends only on its per-sample NLLs and its incumbent's, so a warm cache changes the work, never a
decision or a charge.

Memory of what was spent: the groups a set has been scored on are kept (`RaceStore`, per set:
summed NLL and tokens per sample), so a later need (another incumbent, the same set at another
n, the app's slider) continues from them instead of starting over. A set scored on every group goes
to the `NLLCache` like an unraced one (mean NLL and per-sample NLLs), so the confirmation on a
fresh draw (`select/confirm.py`) and the cross-n cache see it as today.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mi_prun.config import as_float, as_int
from mi_prun.errors import MiPrunError
from mi_prun.select.scoring import RowScorer


# ----------------------------------------------------------------------------------------------
# Student's t quantile (no SciPy in the core): the regularised incomplete beta by its continued
# fraction (Lentz), the CDF from it, the quantile by bisection. Checked against SciPy in the tests.


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """The t such that P(T <= t) = p (0 < p < 1), to about 1e-10."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2.0


# ----------------------------------------------------------------------------------------------
# the rule


@dataclass(frozen=True)
class RaceRule:
    """When a partly scored set is dropped (module docstring): a paired t bound at level alpha / K."""

    alpha: float = 0.05
    min_samples: int = 4
    schedule: str = "doubling"  # or "every" (module docstring)
    order: str = "field"  # or "sequence": how the verified search races a stage's sets (module docstring)

    SCHEDULES = ("doubling", "every")
    ORDERS = ("field", "sequence")

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", as_float(self.alpha, "race alpha (error rate of a drop)", 0.0, 1.0,
                                                   open_low=True, open_high=True))
        object.__setattr__(self, "min_samples", as_int(self.min_samples, "race min_samples", minimum=2))
        if self.schedule not in self.SCHEDULES:
            raise MiPrunError(f"race schedule must be one of {', '.join(self.SCHEDULES)}, got {self.schedule!r}. "
                              "Fix: doubling (looks at min_samples, then each time the samples double) or every "
                              "(after every group).")
        if self.order not in self.ORDERS:
            raise MiPrunError(f"race order must be one of {', '.join(self.ORDERS)}, got {self.order!r}. Fix: field "
                              "(a stage's first looks first, then its sets best-looking first) or sequence (one by "
                              "one in the search's order).")

    def looks(self, groups: Sequence[Sequence[int]]) -> list[int]:
        """The sample counts after which a set may be dropped (never after the last group, never
        before `min_samples`): after every such group ("every"), or at the first, then each time the
        samples have doubled since the last look ("doubling")."""
        out, m = [], 0
        for g in groups[:-1]:
            m += len(g)
            if m < self.min_samples:
                continue
            if self.schedule == "every" or not out or m >= 2 * out[-1]:
                out.append(m)
        return out

    def bound(self, m: int, n_looks: int) -> float:
        """The t multiplier of the paired standard error at m samples with K = `n_looks` looks."""
        return t_quantile(1.0 - self.alpha / max(1, n_looks), m - 1)

    def drops(self, diffs: Sequence[float], n_looks: int) -> bool:
        """Whether paired differences (set minus incumbent, per sample) show the set worse beyond the
        bound; fewer than `min_samples` finite differences never drop."""
        d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=np.float64)
        m = len(d)
        if m < self.min_samples or m < len(diffs) or n_looks < 1:
            return False
        mean = float(d.mean())
        se = float(d.std(ddof=1)) / math.sqrt(m)
        if se == 0.0:
            return mean > 0.0
        return mean > self.bound(m, n_looks) * se

    def describe(self) -> str:
        m = self.min_samples
        when = (f"at the first group from {m} samples on, then each time the samples double"
                if self.schedule == "doubling" else f"after every group from {m} samples on")
        return (f"paired t bound: a set is dropped at a look ({when}, never after the last group) once its mean "
                f"per-sample NLL gap to the best complete set exceeds t(1 - {self.alpha:g}/K, m - 1) paired "
                f"standard errors, K the looks (Bonferroni); a set at least as good is dropped with probability at "
                f"most {self.alpha:g} per comparison (normal paired differences)")


# ----------------------------------------------------------------------------------------------
# what was spent on each set


@dataclass
class Partial:
    """The groups a set was scored on: summed NLL and tokens of each of their samples."""

    sums: dict[int, np.ndarray] = field(default_factory=dict)  # group -> (len(group),) float64
    counts: dict[int, np.ndarray] = field(default_factory=dict)  # group -> (len(group),) int64


RaceStore = dict  # tuple(removed) -> Partial; kept on the NLLCache (`cache.partial`) when it has one


@dataclass(frozen=True)
class Outcome:
    """What racing one set gave.

    nll: the mean NLL over every sample when `complete`; for a dropped set the paired estimate of
        it, the incumbent's mean plus the mean per-sample gap on the samples scored (comparable
        with complete sets' NLLs, which a plain mean over the first samples is not: samples differ
        in difficulty), NaN for a broken pass.
    cached: no new forward work was done.
    samples: the samples the decision rests on.
    units: token-block units this set is charged (what a cold cache would spend on it in this
        race); `new_units` the units really run now (the rest came from the caches).
    """

    nll: float
    cached: bool
    complete: bool
    samples: int
    units: int
    new_units: int


class Race:
    """Scores sets group by group against an incumbent (module docstring).

    `units` is what the sets raced here are charged (as from a cold cache: a warm cache changes
    the work done, never a decision or a charge), `new_units` the work really done, `full_units`
    what the same sets would cost scored on every sample.
    """

    def __init__(self, scorer: RowScorer, rule: RaceRule | None = None, store: RaceStore | None = None) -> None:
        groups = [[int(i) for i in g] for g in scorer.groups]
        if not groups or any(not g for g in groups):
            raise MiPrunError("racing needs the verification samples in non-empty groups. Fix: give at least one "
                              "verification sample, or turn racing off (verify_race off).")
        self.scorer, self.groups = scorer, groups
        self.rule = rule if rule is not None else RaceRule()
        if store is None:
            store = getattr(scorer.cache, "partial", None)
        self.store: RaceStore = store if store is not None else {}
        self.n_samples = sum(len(g) for g in groups)
        self.n_looks = len(self.rule.looks(groups))
        self.units = self.new_units = self.full_units = 0
        self.dropped: list[tuple[int, ...]] = []
        self._prefetched: dict[tuple[int, ...], int] = {}  # set -> units its first look ran ahead (`first_look`)

    def _incumbent(self, against: Sequence[int] | None) -> tuple[float, list[float]] | None:
        """(mean NLL, per-sample NLLs) of a complete set, or None (then no set is dropped)."""
        if against is None:
            return None
        key = tuple(sorted(int(b) for b in against))
        mean, per = self.scorer.cache.get(key), self.scorer.cache.sample_nll(key)
        if mean is None or per is None or len(per) != self.n_samples or not math.isfinite(mean):
            return None
        return float(mean), list(per)

    def full_cost(self, removed: Iterable[int]) -> int:
        """Units of `removed` scored on every sample (no forward work)."""
        return int(self.scorer.units(tuple(sorted(int(b) for b in removed)), list(range(len(self.groups)))))

    def first_look_cost(self, removed: Iterable[int]) -> int:
        """The least a set can be charged in this race: the units up to the first look (every group
        when there is none)."""
        return int(self.scorer.units(tuple(sorted(int(b) for b in removed)), list(range(self._first_groups()))))

    def _first_groups(self) -> int:
        """How many groups the first look needs (every group when there is no look)."""
        looks = self.rule.looks(self.groups)
        m = 0
        for g, members in enumerate(self.groups):
            m += len(members)
            if looks and m == looks[0]:
                return g + 1
        return len(self.groups)

    def _run_group(self, key: tuple[int, ...], g: int, part: Partial) -> int:
        """Score group g of `key` into `part` unless it holds it; the units really run."""
        if g in part.sums:
            return 0
        before = getattr(self.scorer, "work", None)  # what really runs (kept runs' states serve)
        sums, counts = self.scorer.rows(key, [g])
        part.sums[g] = sums.detach().cpu().double().numpy().reshape(-1)
        part.counts[g] = counts.detach().cpu().long().numpy().reshape(-1)
        after = getattr(self.scorer, "work", None)
        return int(after - before) if isinstance(before, int) and isinstance(after, int) \
            else int(self.scorer.units(key, [g]))

    def field_order(self, sets: Sequence[Iterable[int]], each: Callable[[int], None] | None = None) -> list[int]:
        """The order to race a field of sets in ("field", module docstring): every set's first look is
        run (the groups no cache holds), then the indices of `sets` from the lowest mean NLL over the
        first look's samples (the same samples for every set, so the means rank them; a broken pass
        last, ties in the order given). The work is reported by each set's `score`, which replays
        the groups run here; charges and decisions are `score`'s alone. `each(k)` is called after the k-th
        set's first look (the search's progress, and a cancel)."""
        means = self.first_look(sets, each)
        return [i for _, _, i in sorted((math.isnan(m), m if not math.isnan(m) else 0.0, i)
                                        for i, m in enumerate(means))]

    def first_look(self, sets: Sequence[Iterable[int]], each: Callable[[int], None] | None = None) -> list[float]:
        """Each set's mean NLL over the first look's samples (NaN for a broken pass), running the
        groups no cache holds (`field_order`)."""
        upto = self._first_groups()
        samples = [i for g in self.groups[:upto] for i in g]
        out = []
        for removed in sets:
            key = tuple(sorted(int(b) for b in removed))
            mean, per = self.scorer.cache.get(key), self.scorer.cache.sample_nll(key)
            if mean is not None and per is not None and len(per) == self.n_samples:
                vals = [per[i] for i in samples]
            elif mean is not None:  # complete without per-sample NLLs: its mean is all there is
                vals = [float(mean)]
            else:
                part = self.store.setdefault(key, Partial())
                self._prefetched[key] = self._prefetched.get(key, 0) + sum(
                    self._run_group(key, g, part) for g in range(upto))
                sums = np.concatenate([part.sums[g] for g in range(upto)])
                counts = np.concatenate([part.counts[g] for g in range(upto)])
                vals = [s / c if c else math.nan for s, c in zip(sums.tolist(), counts.tolist())]
            out.append(float(np.mean(vals)) if all(math.isfinite(v) for v in vals) else math.nan)
            if each is not None:
                each(len(out) - 1)
        return out

    def score(self, removed: Iterable[int], against: Sequence[int] | None = None) -> Outcome:
        """Race `removed` against the complete set `against` (None: score every group). The looks
        are replayed from the first group whatever the caches hold, so the decision and the charge
        are those of a cold cache; only groups no cache holds are run."""
        key = tuple(sorted(int(b) for b in removed))
        cache = self.scorer.cache
        known_mean, known_per = cache.get(key), cache.sample_nll(key)
        whole = known_mean is not None and (known_per is None or len(known_per) == self.n_samples)
        part = self.store.setdefault(key, Partial())
        inc = self._incumbent(against)
        looks = set(self.rule.looks(self.groups))
        per: list[float] = []  # per-sample mean NLL, samples in group order
        seen: list[int] = []
        charged, new = 0, self._prefetched.pop(key, 0)  # the first look run ahead (`first_look`) is this set's work
        self.full_units += self.full_cost(key)
        for g, members in enumerate(self.groups):
            if whole and known_per is None:  # a complete score without per-sample NLLs: nothing to replay
                charged = self.full_cost(key)
                break
            if whole:
                per += [known_per[i] for i in members]  # type: ignore[index]
            else:
                new += self._run_group(key, g, part)
                per += [s / c if c else math.nan for s, c in zip(part.sums[g].tolist(), part.counts[g].tolist())]
            charged += int(self.scorer.units(key, [g]))
            seen += members
            if g == len(self.groups) - 1:
                break
            if not all(math.isfinite(x) for x in per):  # a broken pass never wins
                return self._done(key, Outcome(math.nan, new == 0, False, len(seen), charged, new), dropped=True)
            if inc is not None and len(seen) in looks:
                diffs = [x - inc[1][i] for x, i in zip(per, seen)]
                if self.rule.drops(diffs, self.n_looks):
                    estimate = inc[0] + float(np.mean(diffs))
                    return self._done(key, Outcome(estimate, new == 0, False, len(seen), charged, new), dropped=True)
        if whole:
            mean = float(known_mean)  # type: ignore[arg-type]
        else:
            sums = np.concatenate([part.sums[g] for g in range(len(self.groups))])
            counts = np.concatenate([part.counts[g] for g in range(len(self.groups))])
            if int(counts.sum()) == 0:
                raise MiPrunError("no verification token to score (all masked). Fix: give longer samples.")
            mean = float(sums.sum()) / int(counts.sum())
            order = {i: x for i, x in zip(seen, per)}
            cache.put(key, mean, tuple(order[i] for i in range(self.n_samples)))
        return self._done(key, Outcome(mean, new == 0, True, self.n_samples, charged, new), dropped=False)

    def _done(self, key: tuple[int, ...], out: Outcome, dropped: bool) -> Outcome:
        self.units += out.units
        self.new_units += out.new_units
        if dropped:
            self.dropped.append(key)
        return out

    def record(self) -> dict[str, Any]:
        """The verification record's "race" entry."""
        return {"rule": self.rule.describe(), "alpha": self.rule.alpha, "min_samples": self.rule.min_samples,
                "schedule": self.rule.schedule, "order": self.rule.order, "groups": [len(g) for g in self.groups],
                "looks": self.rule.looks(self.groups),
                "units": self.units, "new_units": self.new_units, "units_unraced": self.full_units,
                "dropped": len(self.dropped)}


__all__ = ["Outcome", "Partial", "Race", "RaceRule", "RaceStore", "t_cdf", "t_quantile"]
