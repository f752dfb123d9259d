"""mi-prun: find and remove redundant transformer blocks of decoder-only LLMs with mutual information.

The library is pure computation (no UI imports); the CLI (`mi_prun.cli`) and the Streamlit app are
thin shells over it. Blocks are numbered from 0 everywhere.
"""

__version__ = "0.1.0"

from mi_prun.errors import MiPrunError  # noqa: E402

__all__ = ["MiPrunError", "__version__"]
