"""The shipped defaults, in one place, each chosen by the quality benchmark.

See benchmarks/RESULTS.md for the numbers behind every value and the command that produced them.
"""

ESTIMATOR = "gaussian-channel"
ESTIMATOR_OPTIONS = {"preprocess": "standardize"}
DROP_FIRST = True  # drop each sample's first position (attention sink)
SELECTOR = "fbs"
RUN_COST = "neg-mi"
PROTECT_ENDS = False
RATIO = 0.25
