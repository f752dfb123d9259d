"""What the verified search verifies on (`SelectConfig.verify_on`): a text, or a multiple-choice task.

The verified search (`verify.verified_search`) is a pure search over any scorer
`score(removed) -> (value, cached)`, lower is better. `verification_source` turns `verify_on` into
the scorer `verify.verified_select` runs (`verification_scorer`):

- None (the default): verification tokens from the analysis's calibration text, apart from the
  capture's samples (`verify.resolve_tokens`, unchanged);
- a text source (`builtin`, `wikitext2`, a file or folder, `text:...`, as `--calib` takes):
  `verify_samples` x `verify_seq_len` tokens drawn from it (seed 0), scored by next-token NLL like
  the calibration tokens;
- a task YAML file (or folder) in lm-eval's format, multiple-choice: a `TaskScorer`.

Why the task scorer minimises the *choice NLL* and not 1 - accuracy. For item i with choices c and
summed log-likelihoods ll_i(c) (lm-eval's requests, `zeroshot.multiple_choice_items`), the score of
a removed set is the mean over items of

    -log softmax_c(ll_i(c))[answer_i] = -ll_i(answer_i) + logsumexp_c ll_i(c),

the cross-entropy of the model's choice distribution against the answer. Accuracy is a step
function of the same margins: with a few hundred items many candidate sets tie, and one item more or
less decides between them, so a search on it follows noise. The raw NLL of the correct continuation
rewards fluency, not discrimination: a set that makes every choice likelier scores better without
choosing better. The choice NLL is a proper scoring rule for the decision accuracy measures, is
continuous, and is lowest exactly when the answer takes all the mass. The winner's accuracy is
reported beside it (`verification["task"]`).

Cost: one forward pass over every (item, choice) sequence per set, counted as one pass; no
prefix cache (sequences are short). Scores are cached per removed set in the search's `NLLCache`,
bound to the task's items.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from mi_prun.config import SelectConfig, ZeroShotConfig, as_int
from mi_prun.data import calibration_tokens, load_text
from mi_prun.errors import MiPrunError
from mi_prun.runtime.identity import check_same_model
from mi_prun.runtime.loss import continuation_loglik
from mi_prun.runtime.runner import BlockRunner
from mi_prun.select.scorer import NLLCache, PrefixScorer, model_scorer, unwrap_model
from mi_prun.zeroshot import YAML_SUFFIXES, ChoiceItem, check_items_fit, multiple_choice_items, task_provenance


def is_task_spec(spec: str) -> bool:
    """Whether `verify_on` names a task (a YAML file, or a folder holding task YAMLs)."""
    if spec.startswith("text:"):
        return False
    path = Path(spec).expanduser()
    if path.suffix.lower() in YAML_SUFFIXES:
        return True
    try:
        return path.is_dir() and any(p.suffix.lower() in YAML_SUFFIXES for p in path.iterdir())
    except OSError:  # not a path at all (a name too long for one)
        return False


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HF wrapper builds a loglikelihood request:
    trailing spaces of the context move to the continuation, the whole string is encoded with the
    tokenizer's default special tokens, and the continuation is what follows the context's ids."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


class TaskScorer:
    """Mean choice NLL (module docstring) of a model with blocks removed, on multiple-choice items.

    The same call as the verified search's NLL scorer: `score(removed) -> (value, cached)`.
    `accuracy(removed)` is the share of items whose answer has the highest log-likelihood
    (lm-eval's `acc`), from the same pass.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, items: Sequence[ChoiceItem], cache: Any,
                 batch_size: int = 8, provenance: Any = None) -> None:
        if not items:
            raise MiPrunError("the verification task holds no item. Fix: give a task with items.")
        self.model, self.cache = model, cache
        self.batch_size = as_int(batch_size, "batch_size")
        self.items = list(items)
        self.provenance = {"kind": "task", "items": len(self.items), "tasks": provenance or []}
        self.dense_passes = 0
        self.progress = None  # no search on a task reports through the scorer
        seqs: list[tuple[int, int, list[int], int]] = []  # (item, choice, ids, first continuation position)
        for i, it in enumerate(self.items):
            for j, choice in enumerate(it.choices):
                ctx, cont = _encode_pair(tokenizer, it.context, choice)
                if not ctx or not cont:
                    raise MiPrunError(f"task {it.task}, item {it.doc_id}: an empty context or choice cannot be "
                                      "scored. Fix: give every item a context and non-empty choices.")
                seqs.append((i, j, ctx + cont, len(ctx)))
        check_items_fit(model, ((self.items[i], len(ids)) for i, _, ids, _ in seqs))  # none scored cut short
        self.seqs = sorted(seqs, key=lambda s: -len(s[2]))  # similar lengths batched together
        self.pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = int(self.pad) if self.pad is not None else 0
        digest = hashlib.sha256(repr([(s[2], s[3]) for s in seqs]).encode())
        digest.update(repr([it.target for it in self.items]).encode())
        self.key = "task:" + digest.hexdigest()[:16]
        cache.bind(model, self.key)
        self.acc: dict[tuple[int, ...], float] = {}
        self._runner: BlockRunner | None = None

    def _loglik(self, removed: tuple[int, ...]) -> list[list[float]]:
        """ll[item][choice]: summed log-probability of each choice's tokens given its context, with
        `removed` skipped (the one block runner, whatever holds the weights)."""
        ll = [[math.nan] * len(it.choices) for it in self.items]
        if self._runner is None:
            self._runner = BlockRunner(self.model, batch_size=self.batch_size)
        runner = self._runner
        for start in range(0, len(self.seqs), self.batch_size):
            batch = self.seqs[start:start + self.batch_size]
            T = max(len(s[2]) for s in batch)
            ids = torch.full((len(batch), T), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for r, (_, _, seq, _) in enumerate(batch):  # right padding: no real token sees a pad
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            runner.load(ids, mask)
            logits = next(iter(runner.logits(runner.last(runner.h0, skip=removed))))
            for r, (i, j, seq, first) in enumerate(batch):
                ll[i][j] = continuation_loglik(logits, seq, first, r)
        return ll

    def measure(self, removed: Iterable[int]) -> tuple[float, float]:
        """(mean choice NLL, accuracy) with `removed` skipped; one pass over every sequence."""
        rem = tuple(sorted(int(b) for b in removed))
        ll = self._loglik(rem)
        nll, hits = 0.0, 0
        for it, row in zip(self.items, ll):
            t = torch.tensor(row, dtype=torch.float64)
            nll += float(torch.logsumexp(t, 0) - t[it.target])
            hits += int(max(range(len(row)), key=lambda c: (row[c], -c)) == it.target)
        return nll / len(self.items), hits / len(self.items)

    def score(self, removed: Iterable[int]) -> tuple[float, bool]:
        """(mean choice NLL, whether it came from the cache)."""
        key = tuple(sorted(int(b) for b in removed))
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True
        value, acc = self.measure(key)
        self.cache.put(key, value)
        self.acc[key] = acc
        return value, False

    def accuracy(self, removed: Iterable[int]) -> float:
        key = tuple(sorted(int(b) for b in removed))
        if key not in self.acc:
            self.acc[key] = self.measure(key)[1]
        return self.acc[key]

    def report(self, winner: Sequence[int], one_pass: Sequence[int] | None) -> dict[str, Any]:
        """The verification record's "task" entry: the scoring rule, winner's and one-pass accuracy."""
        out = {"rule": "mean over items of -log softmax over choices of the summed log-likelihoods, at the answer",
               "items": len(self.items), "winner_accuracy": self.accuracy(winner)}
        if one_pass is not None:
            out["one_pass_accuracy"] = self.accuracy(one_pass)
        return out


def verification_scorer(model: Any, analysis: Any, config: SelectConfig, *, n_blocks: int, starts: Iterable[int],
                        tokenizer: Any = None, tokens: Any = None, batch_size: int = 8, cache: NLLCache | None = None,
                        force: bool = False) -> PrefixScorer | TaskScorer:
    """`scorer.model_scorer` with `config.verify_on` honoured (module docstring): given `tokens`, or
    with verify_on None, exactly model_scorer; a text source: model_scorer on `verify_samples` x
    `verify_seq_len` tokens of it (seed 0); a task: a `TaskScorer` on its items."""
    spec = config.verify_on
    if tokens is None and spec is not None:
        module, tokenizer = unwrap_model(model, tokenizer, config)
        if tokenizer is None:
            raise MiPrunError("verifying on a text or task needs the tokenizer. Fix: pass a LoadedModel.")
        if is_task_spec(spec):
            if analysis is not None:
                check_same_model(getattr(analysis, "model", None), n_blocks, module, force=force,
                                 where="the analysis")
            zcfg = ZeroShotConfig(tasks=(spec,), limit=config.verify_items)
            return TaskScorer(module, tokenizer, multiple_choice_items(zcfg), cache if cache is not None else NLLCache(),
                              batch_size, provenance=task_provenance(zcfg))
        text = load_text(spec, purpose="calibration")  # wikitext2: the validation split, never the test split
        tokens = calibration_tokens(tokenizer, text, config.verify_samples, config.verify_seq_len, seed=0)
    return model_scorer(model, analysis, config, n_blocks=n_blocks, starts=starts, tokenizer=tokenizer,
                        tokens=tokens, batch_size=batch_size, cache=cache, force=force)


__all__ = ["TaskScorer", "is_task_spec", "verification_scorer"]
