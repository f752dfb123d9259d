"""Every number of a small pipeline on the built-in model, to compare two versions of mi-prun.

Analysis (block MI of the capture), verified selection at n = 2 and 4 (every set's NLL), perplexity of
the chosen sets and healing (run statistics, held-out NLLs, healed perplexity), written as JSON.
Run it in two checkouts and compare the files; the runtime restructure (one weight source and one
block runner) was checked this way against the commit before it, bitwise equal:

    MI_PRUN_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/runtime_equivalence.py new.json
    (cd ../old-checkout && MI_PRUN_DATA_DIR=../shared/data PYTHONPATH=. python \
        ../main/benchmarks/runtime_equivalence.py old.json)
    python -c "import json; a, b = (json.load(open(f)) for f in ('old.json', 'new.json')); print(a == b)"
"""

import json
import sys

import torch
from mi_prun.config import AnalysisConfig, SelectConfig, HealConfig
try:
    from mi_prun.runtime import load_model
except ImportError:  # a version before mi_prun.runtime
    from mi_prun.models import load_model
from mi_prun.pipeline import analyze
from mi_prun.select import select
from mi_prun.models import pruned_view
from mi_prun.evaluate import perplexity
from mi_prun.data import load_text
from mi_prun.heal import heal, heal_calibration

torch.manual_seed(0)
loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
a = analyze(loaded, AnalysisConfig(calib="wikitext2", n_samples=16, seq_len=128))
out = {"block_mi": [float(x) for x in a.block_mi]}
text = load_text("wikitext2", purpose="evaluation").text
# the search as it was before racing (a version without verify_race has none); rows as dicts or typed
unraced = {"verify_race": "off"} if "verify_race" in SelectConfig.__dataclass_fields__ else {}


def field(row, name):
    return row[name] if isinstance(row, dict) else getattr(row, name)


for n in (2, 4):
    sel = select(a, SelectConfig(n=n, verify_passes=6, verify_samples=8, verify_seq_len=128, **unraced), model=loaded)
    v = {"scored": sel.candidates or []}
    out[f"n{n}"] = {"removed": list(sel.removed),
                    "scored": [[list(field(r, "removed")), field(r, "nll")] for r in v.get("scored", [])]}
    p = perplexity(pruned_view(loaded.model, sel.removed), loaded.tokenizer, text, seq_len=256, max_windows=8)
    out[f"n{n}"]["ppl"] = p.ppl
hcfg = HealConfig(calib="wikitext2", n_samples=16, seq_len=128)
healed, rec = heal(loaded.model, out["n4"]["removed"], heal_calibration(loaded, hcfg), config=hcfg)
out["heal"] = [[r.start, r.end, r.unexplained_healed, r.holdout_nll] for r in rec.runs]
out["heal_ppl"] = perplexity(healed, loaded.tokenizer, text, seq_len=256, max_windows=8).ppl
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
print(json.dumps(out)[:2000])
