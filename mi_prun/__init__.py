"""mi-prun: find and remove redundant transformer blocks of decoder-only LLMs with mutual information.

The library is pure computation (no UI imports); the CLI (`mi_prun.cli`) and the Streamlit app are
thin shells over it. Blocks are numbered from 0 everywhere. The public API, in data-flow order:

    load_model -> analyze(loaded, AnalysisConfig) -> Analysis -> select(analysis, SelectConfig)
    -> Selection -> prune(model, removed) -> evaluate / perplexity -> export

Names are imported lazily (`import mi_prun` stays fast; torch loads on first use). Four functions
share their name with their module and are imported from it: `mi_prun.select.select`,
`mi_prun.models.prune`, `mi_prun.capture.capture` and
`mi_prun.evaluate.evaluate`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from mi_prun.errors import MiPrunError  # noqa: E402

# public name -> module that defines it
_API = {
    "AnalysisConfig": "mi_prun.config", "SelectConfig": "mi_prun.config", "EvalConfig": "mi_prun.config",
    "ExportConfig": "mi_prun.config", "ZeroShotConfig": "mi_prun.config",
    "load_model": "mi_prun.runtime", "LoadedModel": "mi_prun.runtime", "find_blocks": "mi_prun.models",
    "pruned_view": "mi_prun.models",
    "load_text": "mi_prun.data", "calibration_tokens": "mi_prun.data",
    "get_estimator": "mi_prun.estimators", "list_estimators": "mi_prun.estimators",
    "analyze": "mi_prun.pipeline",
    "Analysis": "mi_prun.results",
    "compare": "mi_prun.select", "sleb_select": "mi_prun.select", "Selection": "mi_prun.select",
    "export": "mi_prun.export",
    "perplexity": "mi_prun.evaluate", "generate_sample": "mi_prun.evaluate", "zero_shot": "mi_prun.zeroshot",
}

__all__ = ["MiPrunError", "__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mi_prun' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
