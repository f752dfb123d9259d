"""Which verification text ranks pruned models like the test split? NLL of every removed set of a
`quality.py --suite verified` results file on 8 x 256 tokens of (a) WikiText-2 validation as
released (`.tokens`, rare words replaced by `<unk>`) and (b) the same text with every `<unk>`
dropped, against the sets' test perplexity, with Spearman's rank correlation per n.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/verification_text.py \
        benchmarks/results/quality-smollm2-135m-verified-heal.json
"""
import json
import sys
import numpy as np
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from mi_prun.models import pruned_view
from mi_prun.runtime import load_model
from mi_prun.data import load_text, tokenize
from mi_prun.evaluate import token_nll

res = json.load(open(sys.argv[1]))
loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
raw = load_text("wikitext2-valid", purpose="calibration").text
texts = {"valid.tokens": raw, "valid without <unk>": raw.replace(" <unk>", "")}
sets = {}
for r in res["rows"]:
    if not r.get("healed"):
        sets.setdefault(tuple(r["removed"]), {"ppl": r["ppl"], "n": r["n"], "methods": set()})["methods"].add(r["method"])
out = {}
for name, text in texts.items():
    ids = tokenize(loaded.tokenizer, text)
    body = 256
    n_chunks = ids.numel() // body
    pick = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(123))[:8].sort().values
    toks = ids[: n_chunks * body].view(n_chunks, body)[pick]
    for key, info in sets.items():
        t, c = token_nll(pruned_view(loaded.model, key), toks)
        info[name] = t / c
for n in sorted({v["n"] for v in sets.values()}):
    rows = [(k, v) for k, v in sets.items() if v["n"] == n]
    print(f"n={n}")
    for k, v in sorted(rows, key=lambda kv: kv[1]["ppl"]):
        print(f"  test ppl {v['ppl']:8.1f}  nll valid.tokens {v['valid.tokens']:.4f}  nll no-unk {v['valid without <unk>']:.4f}  {sorted(v['methods'])} {list(k)}")
    ppl = np.log([v["ppl"] for _, v in rows])
    for name in texts:
        x = np.array([v[name] for _, v in rows])
        rho = np.corrcoef(np.argsort(np.argsort(ppl)), np.argsort(np.argsort(x)))[0, 1]
        print(f"  Spearman(test log-ppl, NLL on {name}) = {rho:.2f}")
