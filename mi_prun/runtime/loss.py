"""The loss functions every forward pass of mi-prun ends in: next-token NLL per row, and choice log-likelihoods.

Perplexity, the verified search, SLEB-style removal, healing's check and the task scorer all score
through these, whichever weight source ran the blocks.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def nll_rows(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ids (B, T): the summed next-token NLL (float64, on the CPU) of logits (B, T, V)
    and the tokens scored, positions t >= 1 whose token and predecessor are both unmasked.
    Log-softmax in float32 (bf16 logits lose the small probabilities that dominate NLL)."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                          ids[:, 1:].reshape(-1).to(logits.device), reduction="none").view(ids.shape[0], -1)
    if mask is None:
        valid = torch.ones_like(nll, dtype=torch.bool)
    else:
        valid = ((mask[:, 1:] > 0) & (mask[:, :-1] > 0)).to(nll.device)
    sums = torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device)).double().sum(dim=1)
    return sums.cpu(), valid.sum(dim=1).cpu()


def continuation_loglik(logits: torch.Tensor, seq: list[int], first: int, row: int) -> float:
    """Summed log-probability (float64) of tokens seq[first:] of row `row` of logits (B, T, V), each
    predicted from the positions before it (lm-eval's loglikelihood request)."""
    logp = F.log_softmax(logits[row, first - 1:len(seq) - 1].float(), dim=-1)
    tgt = torch.tensor(seq[first:], device=logp.device)
    return float(logp.gather(1, tgt[:, None]).double().sum())


__all__ = ["continuation_loglik", "nll_rows"]
