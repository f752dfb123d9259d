"""Racing in the verified search (mi_prun.select.race): the rule, its error rate, and the search
raced against the search unraced, on synthetic scorers with known means and noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mi_prun.config import SelectConfig
from mi_prun.errors import MiPrunError
from mi_prun.select.candidates import propose
from mi_prun.select.race import Race, RaceRule, t_cdf, t_quantile
from mi_prun.select.scorer import NLLCache
from mi_prun.select.scoring import RowScorer, SetScorer, can_race
from mi_prun.select.verify import verified_search


class Synthetic:
    """A `RowScorer` with known answers: sample i of set s has mean NLL per token
    `mean(s) + difficulty[i] + noise(s, i)` (noise fixed per set and sample, N(0, sigma^2)); every
    sample has `tokens` tokens; a pass from the first removed block b runs L - b - n blocks + the head."""

    def __init__(self, mean, n_samples: int = 16, group: int = 4, sigma: float = 0.05, seed: int = 0,
                 n_blocks: int = 12, tokens: int = 10, heavy: bool = False) -> None:
        self.mean, self.sigma, self.seed, self.heavy = mean, sigma, seed, heavy
        self.n_blocks, self.tokens, self.n_samples = n_blocks, tokens, n_samples
        self.difficulty = np.random.default_rng([seed, 1]).normal(0.0, 1.0, n_samples)
        self.groups = [list(range(i, min(i + group, n_samples))) for i in range(0, n_samples, group)]
        self.cache, self.provenance, self.dense_passes, self.progress = NLLCache(), {"source": "synthetic"}, 0, None
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def per_sample(self, removed) -> np.ndarray:
        key = tuple(sorted(removed))
        rng = np.random.default_rng([self.seed, 2, *key, 99])
        e = rng.standard_t(5, self.n_samples) / math.sqrt(5 / 3) if self.heavy else rng.normal(0, 1, self.n_samples)
        return self.mean(key) + self.difficulty + self.sigma * e

    def rows(self, removed, groups=None):
        groups = list(range(len(self.groups))) if groups is None else list(groups)
        self.calls.append((tuple(sorted(removed)), tuple(groups)))
        idx = [i for g in groups for i in self.groups[g]]
        per = self.per_sample(removed)[idx]
        return torch.tensor(per * self.tokens, dtype=torch.float64), torch.full((len(idx),), self.tokens)

    def units(self, removed, groups=None) -> int:
        groups = list(range(len(self.groups))) if groups is None else list(groups)
        rem = sorted(removed)
        blocks = self.n_blocks - rem[0] - len(rem) + 1
        return sum(len(self.groups[g]) for g in groups) * self.tokens * blocks

    def score(self, removed):
        key = tuple(sorted(removed))
        got = self.cache.get(key)
        if got is not None:
            return got, True
        sums, counts = self.rows(key)
        per = (sums / counts).tolist()
        self.cache.put(key, float(sums.sum()) / int(counts.sum()), per)
        return self.cache.get(key), False


def full_mean(scorer: Synthetic, removed) -> float:
    return float(scorer.per_sample(removed).mean())


def test_t_quantile_matches_the_tables():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 5, 7, 11, 15, 40):
        for p in (0.6, 0.95, 0.975, 0.99, 0.9983, 0.9999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-6), (p, df)
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)
    assert t_quantile(0.975, 10) == pytest.approx(2.228, abs=1e-3)  # the printed table


def test_rule_looks_and_drops():
    every = RaceRule(alpha=0.05, min_samples=4, schedule="every")
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert every.looks(groups) == [4, 6]  # never after the last group, never before 4 samples
    rule = RaceRule(alpha=0.05, min_samples=4)  # the shipped schedule: doubling
    assert rule.looks(groups) == [4]
    sixteen = [[4 * g + i for i in range(4)] for g in range(4)]
    assert rule.looks(sixteen) == [4, 8] and every.looks(sixteen) == [4, 8, 12]
    assert rule.looks([[i] for i in range(16)]) == [4, 8]  # groups of one: the same looks
    assert rule.looks([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15]]) == [6, 12]
    assert rule.looks([[0, 1, 2, 3]]) == []  # one group: scored whole
    bound = rule.bound(4, 2)
    assert bound == pytest.approx(t_quantile(1 - 0.025, 3))
    d = [0.1, 0.12, 0.09, 0.11]  # mean 0.105, se 0.0065: 16 SE
    assert rule.drops(d, 2) and not rule.drops([-x for x in d], 2)
    assert not rule.drops(d[:3], 2)  # fewer than min_samples
    assert not rule.drops([0.1, -0.1, 0.12, -0.08], 2)  # within noise
    assert not rule.drops([0.1, math.nan, 0.1, 0.1, 0.1], 2)  # a non-finite difference: no decision here
    with pytest.raises(MiPrunError):
        RaceRule(alpha=0.0)
    with pytest.raises(MiPrunError, match="doubling"):
        RaceRule(schedule="halving")


def test_synthetic_and_real_scorers_implement_the_protocols():
    from mi_prun.select.scorer import PrefixScorer
    from mi_prun.select.task_scorer import TaskScorer

    s = Synthetic(lambda k: 1.0)
    assert isinstance(s, RowScorer) and can_race(s) and isinstance(s, SetScorer)
    for cls in (PrefixScorer, TaskScorer):  # both give what Problem.scorer promises
        assert all(hasattr(cls, m) for m in ("score",))
    assert not can_race(object())


def race_all(scorer: Synthetic, sets, order, rule: RaceRule) -> tuple[tuple[int, ...], Race]:
    """Race `sets` as the search races a stage: each against the best complete set so far, in `order`
    (`rule.order` "sequence") or every first look first, then the best-looking first ("field")."""
    race = Race(scorer, rule, store={})
    best, best_nll = None, math.inf
    if rule.order == "field":
        order = [order[k] for k in race.field_order([sets[k] for k in order])]
    for k in order:
        out = race.score(sets[k], best)
        if out.complete and out.nll < best_nll:
            best, best_nll = sets[k], out.nll
    return best, race


@pytest.mark.parametrize("order", RaceRule.ORDERS)
@pytest.mark.parametrize("schedule", RaceRule.SCHEDULES)
@pytest.mark.parametrize("heavy", [False, True])
def test_the_race_drops_the_best_set_no_more_often_than_its_error_rate(heavy, schedule, order):
    """Many draws of 12 sets with known means: the best by 0.5-2 paired SE over a few close ones,
    the rest clearly worse, scored in random order, Gaussian and heavy-tailed (t, 5 df) noise. The
    set the full evaluation (every sample) ranks best is the race's winner except in at most
    alpha of the draws, and the race saves most of the units on the clearly worse sets."""
    alpha, draws = SelectConfig().verify_race_alpha, 400
    rule = RaceRule(alpha, SelectConfig.RACE_MIN_SAMPLES, schedule, order)
    lost = spent = unraced = dropped = 0
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        sigma = 0.05
        se = sigma * math.sqrt(2 / 16)  # paired SE of a gap over 16 samples
        gaps = np.concatenate([[0.0], rng.uniform(0.5, 2.0, 3) * se, rng.uniform(8, 200, 8) * se])
        sets = [(1 + k,) for k in range(len(gaps))]
        means = {s: 3.0 + g for s, g in zip(sets, gaps)}
        scorer = Synthetic(lambda key, means=means: means[key], sigma=sigma, seed=seed, heavy=heavy)
        truth = min(sets, key=lambda s: full_mean(scorer, s))
        winner, race = race_all(scorer, sets, rng.permutation(len(sets)), rule)
        lost += winner != truth
        spent, unraced, dropped = spent + race.units, unraced + race.full_units, dropped + len(race.dropped)
        assert race.new_units == race.units  # a cold store: every unit charged was run
    print(f"{schedule}, {order}: lost {lost} of {draws}, units {spent / unraced:.2f} of unraced")
    assert lost / draws <= alpha, (lost, draws)
    assert dropped > 4 * draws and spent < 0.8 * unraced  # the race does drop, and saves


def harm_problem(L: int = 14, n: int = 3, seed: int = 0):
    from tests.test_verify import _synthetic_problem

    rng = np.random.default_rng(seed)
    harm = rng.uniform(0.05, 1.0, L)
    pair = rng.normal(0.0, 0.05, (L, L))
    problem = _synthetic_problem(harm, n)

    def mean(key, harm=harm, pair=pair):
        r = list(key)
        return float(harm[r].sum() + pair[np.ix_(r, r)].sum() / 2)

    one = tuple(sorted(int(b) for b in np.argsort(-harm[1:-1])[:n] + 1))
    return problem, mean, propose(problem, None, one, "fbs")


def test_a_race_that_cannot_drop_is_the_unraced_search_exactly():
    """No look possible (min_samples above the sample count): the raced search scores the same sets
    in the same order with the same NLLs as the unraced one, group by group or in one call."""
    for seed in range(4):
        problem, mean, cands = harm_problem(seed=seed, n=2 + seed % 3)
        plain_scorer = Synthetic(mean, seed=seed)
        plain = verified_search(problem, cands, plain_scorer.score, 30)
        raced_scorer = Synthetic(mean, seed=seed)
        raced = verified_search(problem, cands, None, 30, race=Race(raced_scorer, RaceRule(min_samples=99)))
        assert [(r.removed, r.stage, r.proposers) for r in raced.scored] == \
            [(r.removed, r.stage, r.proposers) for r in plain.scored]
        assert [r.nll for r in raced.scored] == pytest.approx([r.nll for r in plain.scored], rel=1e-12)
        assert raced.best.removed == plain.best.removed and all(r.complete for r in raced.scored)


def test_racing_keeps_the_answer_and_spends_a_fraction_of_the_units():
    """`sets` mode (the budget in sets): the same winner as the unraced search on most draws, at
    much less work; `units` mode with the unraced search's spend as budget scores more sets."""
    same = 0
    ratios = []
    for seed in range(12):
        problem, mean, cands = harm_problem(seed=seed, n=2 + seed % 3)
        plain_scorer = Synthetic(mean, seed=seed, sigma=0.02)
        plain = verified_search(problem, cands, plain_scorer.score, 40)
        spent_plain = sum(plain_scorer.units(r.removed) for r in plain.scored)
        race = Race(Synthetic(mean, seed=seed, sigma=0.02))
        sets_mode = verified_search(problem, cands, None, 40, race=race)
        same += sets_mode.best.removed == plain.best.removed
        ratios.append(race.units / spent_plain)
        assert len(sets_mode.scored) <= 40 and sets_mode.units == race.units
        longer = Race(Synthetic(mean, seed=seed, sigma=0.02))
        units_mode = verified_search(problem, cands, None, 40, race=longer, unit_budget=spent_plain)
        # a stage admits sets while their first looks fit, and a set once started is finished: the
        # charge passes the budget by at most the full cost of one stage's sets (a stage: the
        # candidates, or an exchange's put-back sets or trials, at most one per allowed block)
        stage = max(len(cands), len(problem.allowed))
        costs = sorted(longer.full_cost(r.removed) for r in units_mode.scored)
        assert longer.units <= spent_plain + sum(costs[-stage:])
        assert len(units_mode.scored) >= len(plain.scored)
        assert full_mean(plain_scorer, units_mode.best.removed) <= full_mean(plain_scorer, plain.best.removed) + 0.02
    assert same >= 11 and float(np.median(ratios)) < 0.6, (same, ratios)


def test_a_warm_cache_changes_the_work_never_the_decisions_or_the_charge():
    problem, mean, cands = harm_problem(seed=3, n=3)
    scorer = Synthetic(mean, seed=3)
    store: dict = {}
    a = verified_search(problem, cands, None, 25, race=Race(scorer, store=store))
    scorer.calls.clear()
    race_b = Race(scorer, store=store)
    b = verified_search(problem, cands, None, 25, race=race_b)
    assert [(r.removed, r.nll, r.complete, r.samples, r.units) for r in b.scored] == \
        [(r.removed, r.nll, r.complete, r.samples, r.units) for r in a.scored]
    assert race_b.new_units == 0 and scorer.calls == [] and b.passes == 0 and all(r.cached for r in b.scored)
    assert any(not r.complete for r in a.scored)


def test_a_dropped_set_needed_later_continues_where_it_stopped():
    scorer = Synthetic(lambda key: {(1,): 3.0, (2,): 4.0}[key], seed=0)
    race = Race(scorer, store={})
    assert race.score((1,)).complete
    out = race.score((2,), against=(1,))
    assert not out.complete and out.samples == 4 and out.nll == pytest.approx(full_mean(scorer, (2,)), abs=0.05)
    scorer.calls.clear()
    again = race.score((2,))  # no incumbent: scored on every sample, from the groups already held
    assert again.complete and again.new_units == scorer.units((2,), [1, 2, 3])
    assert [g for _, gs in scorer.calls for g in gs] == [1, 2, 3]
    assert again.nll == pytest.approx(full_mean(scorer, (2,)))
    assert scorer.cache.sample_nll((2,)) == pytest.approx(tuple(scorer.per_sample((2,))))


def test_a_broken_set_is_dropped_at_once():
    scorer = Synthetic(lambda key: math.nan if key == (2,) else 3.0)
    race = Race(scorer, store={})
    out = race.score((2,), against=None)
    assert not out.complete and math.isnan(out.nll) and out.samples == 4


def test_the_race_settings_are_checked_and_reach_the_cli():
    from mi_prun.cli.args import build_parser
    from mi_prun.cli.commands import select_config

    args = build_parser().parse_args(["select", "a", "--verify-race", "sets", "--verify-race-alpha", "0.01"])
    cfg = select_config(args)
    assert (cfg.verify_race, cfg.verify_race_alpha) == ("sets", 0.01)
    assert select_config(build_parser().parse_args(["select", "a"])).verify_race == SelectConfig().verify_race
    assert SelectConfig().verify_race == "sets" and SelectConfig(verify_race="UNITS").verify_race == "units"
    for bad in ("fast", 1, None):
        with pytest.raises(MiPrunError, match="Fix: units"):
            SelectConfig(verify_race=bad)
    for bad in (0.0, 0.5, -1, "x"):
        with pytest.raises(MiPrunError, match="verify_race_alpha"):
            SelectConfig(verify_race_alpha=bad)
    with pytest.raises(MiPrunError, match="verify_race_group"):
        SelectConfig(verify_race_group=0)


# ----------------------------------------------------------------------------------------------
# on a tiny model, through select()


@pytest.fixture(scope="module")
def tiny():
    from mi_prun.config import AnalysisConfig
    from mi_prun.runtime import load_model
    from mi_prun.pipeline import analyze

    loaded = load_model("tiny-llama", device="cpu")
    return loaded, analyze(loaded, AnalysisConfig(n_samples=8, seq_len=48))


TINY = SelectConfig(verify_samples=12, verify_seq_len=32)  # 3 groups of 4: looks after 4 and 8 samples


@pytest.fixture
def row_scorer(monkeypatch):
    """The model's scorers made, each counting the calls that score some groups only (a race's)."""
    from mi_prun.select.scorer import PrefixScorer

    made: list[list[int]] = []
    real_init, real_rows = PrefixScorer.__init__, PrefixScorer.rows

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.rows_calls = 0
        made.append(self)

    def rows(self, removed, groups=None, use_prefix=None):
        self.rows_calls += groups is not None
        return real_rows(self, removed, groups, use_prefix)

    monkeypatch.setattr(PrefixScorer, "__init__", init)
    monkeypatch.setattr(PrefixScorer, "rows", rows)
    yield made


def test_select_races_through_the_model_scorer_and_off_never_races(tiny, row_scorer):
    from mi_prun.select import select

    loaded, analysis = tiny
    dropped_any = 0
    for n in (2, 3):
        before = len(row_scorer)
        off = select(analysis, config=TINY.replace(n=n, verify_race="off"), model=loaded)
        assert off.verification["race"] == {"mode": "off"} and all(c.complete for c in off.candidates)
        assert len(row_scorer) > before and all(s.rows_calls == 0 for s in row_scorer[before:])
        sets = select(analysis, config=TINY.replace(n=n, verify_race="sets", verify_race_alpha=0.2), model=loaded)
        assert any(s.rows_calls for s in row_scorer)  # raced: group by group
        race = sets.verification["race"]
        assert race["mode"] == "sets" and race["groups"] == [4, 4, 4] and race["looks"] == [4, 8]
        assert race["units"] <= race["units_unraced"] and sets.verification["sets_scored"] <= off.verification["budget"]
        win = next(c for c in sets.candidates if c.removed == sets.removed)
        assert win.complete and sets.nll == win.nll  # only a set scored on every sample wins
        if not sets.verification["confirm"].get("changed"):  # the confirmation may pick another finalist
            assert sets.nll == min(c.nll for c in sets.candidates if c.complete and len(c.removed) == n)
        dropped = [c for c in sets.candidates if not c.complete]
        assert len(dropped) == race["dropped"] and all(c.samples in (4, 8) and c.units for c in dropped)
        dropped_any += len(dropped)
        assert sets.removed == off.removed  # the tiny model's winner is clear: racing keeps it
        assert all(c.nll > sets.nll for c in dropped if len(c.removed) == n)
        finalists = sets.verification["confirm"].get("finalists") or []
        assert all(tuple(f["removed"]) not in {c.removed for c in dropped} for f in finalists)
        units = select(analysis, config=TINY.replace(n=n, verify_race="units"), model=loaded)
        assert units.verification["race"]["mode"] == "units" and units.verification["race"]["unit_budget"] > 0
    assert dropped_any > 0


def test_the_field_order_keeps_the_answers_for_fewer_units_than_one_by_one():
    """The shipped order ("field": a stage's first looks first, then the best-looking first) against
    racing one set after another in the search's order, on the same synthetic searches: the same winner
    on nearly every problem, and fewer units in all (fewer sets scored to the end)."""
    units = {"field": 0, "sequence": 0}
    winners: dict[str, list] = {"field": [], "sequence": []}
    for seed in range(12):
        problem, mean, cands = harm_problem(L=20, seed=seed, n=2 + seed % 5)
        for order in units:
            race = Race(Synthetic(mean, seed=seed, sigma=0.02, n_blocks=20), RaceRule(order=order))
            out = verified_search(problem, cands, None, 40, race=race)
            units[order] += race.units
            winners[order].append(out.best.removed)
    same = sum(a == b for a, b in zip(winners["field"], winners["sequence"]))
    assert same >= 11 and units["field"] < 0.85 * units["sequence"], (same, units)
    assert SelectConfig.RACE_ORDER == "field" and RaceRule().order == "field"
