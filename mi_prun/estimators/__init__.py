"""Mutual-information estimators behind one interface, for hidden states of transformer blocks.

Input contract: a capture is a float tensor `H` of shape (L+1, m, d): `H[b]` holds m paired samples
(token positions) of the hidden state h_b (h_0 = input of block 0, h_{b+1} = output of block b).
Every estimator gives

  mi(x, y)        MI in nats between two (m, d) layers (positions are the paired samples)
  nmi(x, y)       a normalised variant in [0, 1], or None where the estimator defines none
  span_matrix(H)  (span, span_norm): span (L+1, L+1) symmetric with NaN on the diagonal,
                  span_norm likewise with 1 on the diagonal (or None)
  block_mi(H)     (L,) MI between consecutive layers, without the cost of the full span matrix

and describes itself: `name`, `promises_dpi`, `has_norm`, `defaults` / `default_options()` (its
options and their default values, JSON-serialisable, always including its one default
`preprocess`), `option_help` (one line per option), `min_samples(dim)` and `noisy_samples(dim)`
(paired samples needed for layers of width dim) and `check_samples(m, dim)` (raises MiPrunError
below the minimum, returns a warning line below the noisy threshold, else None).

`get_estimator(name, **options)` builds one from the registry with its own defaults for every
option not given; `describe_estimators()` lists every estimator with its options, defaults and help
lines (for the CLI and the app). Options are checked by type and range when the estimator is built,
before any work: a bad one raises MiPrunError naming the option, the value and the fix; numpy
integers are accepted where integers are expected, bools are not.

Every estimator works in two steps: `_prepare` turns one layer into what the estimator needs
(standardised channels, a whitened PCA basis, a Gram matrix, bin codes, ...), once per layer;
`_pair` / `_span` then combine prepared layers. `span_matrix` prepares each layer once and computes
all pairs as batched matrix products, so it costs little more than L+1 preparations.

Estimators, one module each (see each class for its normalised variant and its sample minimum):

  gaussian-channel  mean over channels of -1/2 log(1 - rho_c^2) (per-channel Gaussian MI)
  gaussian-joint    -1/2 sum_i log(1 - p_i^2) over canonical correlations on a PCA subspace
  renyi-kernel      matrix-based Renyi alpha-entropy MI on Gaussian-kernel Gram matrices
  binning           per-channel plug-in MI on quantile bins, averaged over channels
  ksg               Kraskov-Stoegbauer-Grassberger (algorithm 1) on a whitened PCA subspace

`promises_dpi` says whether the quantity an estimator targets obeys the data processing
inequality for every Markov chain (Shannon MI between the two layers, or between fixed reductions
of them). Per-channel averages do not: a rotation between layers moves information across channels,
so mean_c I(x_c; z_c) can exceed mean_c I(y_c; z_c) although x -> y -> z. They still obey DPI on
chains whose channels evolve separately (as a residual stream roughly does); `scores.dpi_report`
checks it on the real span matrix either way.

Per-layer preprocessing (option `preprocess`): "none", "center", "standardize" (per channel),
"rms" (each token vector divided by its root mean square, the per-token normalisation LLM hidden
states need: a few huge channels and the attention-sink position dominate otherwise). Defaults:
"none" for gaussian-channel (a correlation ignores per-channel shift and scale, so "center" and
"standardize" give the same values), "rms" for the others. Constant channels never produce NaN:
they are treated as carrying no information and logged as a warning.

Sample counts: `span_matrix`, `mi` and `nmi` refuse fewer than `min_samples(dim)` paired samples
(3 for the correlation and kernel estimators, 2 min(k, d) + 2 for gaussian-joint, 2 x bins for
binning, max(4, k_neighbors + 2) for ksg) with a message that says to capture more positions;
`span_matrix` also logs a warning below `noisy_samples(dim)` (10x the minimum; for binning at least
4 x bins^2). `block_mi` does not check: it also serves small per-group stability estimates.

Computation stays on H's device in float32; log-dets, eigen- and singular-value decompositions run
in float64.
"""

from __future__ import annotations

from mi_prun.estimators.base import (
    ESTIMATORS,
    NOISY_FACTOR,
    PREPROCESS,
    RHO_MAX,
    SAMPLES_FIX,
    Estimator,
    describe_estimators,
    get_estimator,
    list_estimators,
    preprocess_layer,
    register,
    standardize,
)
from mi_prun.estimators.binning import Binning
from mi_prun.estimators.gaussian_channel import GaussianChannel
from mi_prun.estimators.gaussian_joint import GaussianJoint
from mi_prun.estimators.ksg import KSG
from mi_prun.estimators.renyi import BANDWIDTH_RULES, RenyiKernel, matrix_renyi_entropy

__all__ = [
    "BANDWIDTH_RULES",
    "ESTIMATORS",
    "KSG",
    "NOISY_FACTOR",
    "PREPROCESS",
    "RHO_MAX",
    "SAMPLES_FIX",
    "Binning",
    "Estimator",
    "GaussianChannel",
    "GaussianJoint",
    "RenyiKernel",
    "describe_estimators",
    "get_estimator",
    "list_estimators",
    "matrix_renyi_entropy",
    "preprocess_layer",
    "register",
    "standardize",
]
