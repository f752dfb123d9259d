"""The shipped defaults, in one place, each chosen by the quality benchmark.

See benchmarks/RESULTS.md for the numbers behind every value and the command that produced them
(`python benchmarks/quality.py ...` on smollm2-135m, WikiText-2, 40 windows of 256 tokens).

- gaussian-channel MI on standardised channels: the only estimator family whose rankings put the
  middle blocks first; the kernel Renyi estimator ranks the last blocks as redundant and wrecks
  the model.
- drop the first position of each sample: it carries the attention-sink activations.
- Fast-Block-Select on the span cost -log NMI(h_i, h_j): runs are judged by their own span MI (the
  DPI part of the method). FBS builds its candidates from the most redundant single blocks, and
  its sets gave lower perplexity than the exact optimum of the same objective at n = 4, 8 and 10
  (equal at 6): the objective is a proxy, and FBS's block-level prior corrects it.
- protect the first and last 10 % of blocks: their removal costs far more perplexity than their
  MI suggests (the last blocks of most LLMs map the residual stream to the output vocabulary).
"""

ESTIMATOR = "gaussian-channel"
ESTIMATOR_OPTIONS = {"preprocess": "standardize"}
DROP_FIRST = True  # drop each sample's first position (attention sink)
SELECTOR = "fbs"
RUN_COST = "neg-log-nmi"
PROTECT_ENDS = 0.1  # fraction of blocks kept at each end (3 of 30 on smollm2-135m)
RATIO = 0.25
