"""Do NLL-verified and task-verified sets differ? (issue 21, point 3)

Builds a local multiple-choice task from a text (a next-phrase cloze: a passage of `--context`
words, the true next `--answer` words against 3 distractor phrases taken from elsewhere in the
text), split into a verification half and a held-out half, as lm-eval task YAMLs. Then, on one
model and one analysis, for each n: the shipped verified search on text (`SelectConfig()`) and the
same search verified on the task's first half (`verify_on=`), each set judged by WikiText-2 test
perplexity (`--eval-windows` x 256 tokens) and by lm-eval accuracy on the held-out half.

    MI_PRUN_DATA_DIR=../shared/data python benchmarks/task_verify.py --ns 2 --items 32 \
        --name task-verify-smollm2-135m

Real PIQA / HellaSwag etc. are not available offline here; this cloze task is built from the
WikiText-2 validation split (without `<unk>`), so it measures whether a task objective changes
the selection, not how the sets do on the field's benchmarks.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mi_prun.config import AnalysisConfig, EvalConfig, SelectConfig  # noqa: E402
from mi_prun.data import load_text  # noqa: E402
from mi_prun.evaluate import evaluate  # noqa: E402
from mi_prun.models import pruned_view  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402
from mi_prun.pipeline import analyze  # noqa: E402
from mi_prun.select import NLLCache, select  # noqa: E402
from mi_prun.zeroshot import zero_shot  # noqa: E402

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  built_from: "{source}, seed {seed}: context {context} words, answer {answer} words, 3 distractors"
"""


def build_cloze(text: str, source: str, folder: Path, items: int, context: int, answer: int, seed: int) -> dict:
    """Two task YAMLs (verify, heldout), `items` each, from disjoint passages of `text`."""
    words = [w for w in text.split() if w not in ("=", "@-@", "@,@", "@.@")]
    rng = random.Random(seed)
    span = context + answer
    starts = rng.sample(range(0, len(words) - span, span), 2 * items + 3 * 2 * items)
    passages, pool = starts[:2 * items], starts[2 * items:]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for half, chunk in (("verify", passages[:items]), ("heldout", passages[items:])):
        rows = []
        for k, s in enumerate(chunk):
            ctx = " ".join(words[s:s + context])
            right = " ".join(words[s + context:s + span])
            wrong = [" ".join(words[p + context:p + span]) for p in pool[3 * (k + (items if half == "heldout" else 0)):][:3]]
            choices = [right] + wrong
            rng.shuffle(choices)
            rows.append({"context": ctx, "choices": choices, "label": choices.index(right)})
        name = f"cloze_{half}"
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(YAML.format(name=name, source=source, seed=seed, context=context,
                                                         answer=answer), encoding="utf-8")
        paths[half] = folder / f"{name}.yaml"
    return paths


def paired_noise(loaded, analysis, cfg, sel) -> dict:
    """The winner against the runner-up of a text-verified search, per verification sample: the mean
    NLL gap (nats) and its paired standard error over the samples (issue 21, point 4: is the
    decision within the verification tokens' sampling noise?)."""
    import math

    from mi_prun.evaluate import token_nll
    from mi_prun.select.scorer import resolve_tokens

    rows = sorted((r for r in sel.candidates if len(r.removed) == sel.n and r.complete), key=lambda r: r.nll)
    if len(rows) < 2:
        return {}
    ids, mask, _ = resolve_tokens(None, loaded.tokenizer, analysis, cfg)
    per = []
    for r in rows[:2]:
        view = pruned_view(loaded.model, r.removed)
        per.append([token_nll(view, ids[i:i + 1])[0] / (ids.shape[1] - 1) for i in range(ids.shape[0])])
    d = [b - a for a, b in zip(*per)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return {"winner": list(rows[0].removed), "runner_up": list(rows[1].removed), "gap_nats": mean, "paired_se": se,
            "samples": len(d), "sets_within_2se": sum(1 for r in rows if r.nll - rows[0].nll < 2 * se)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wikitext2-valid-nounk")
    ap.add_argument("--task-text", default="wikitext2-valid-nounk")
    ap.add_argument("--ns", default="2,4")
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--context", type=int, default=40)
    ap.add_argument("--answer", type=int, default=6)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--name", default="task-verify")
    args = ap.parse_args()
    out_dir = ROOT / "benchmarks" / "results"
    text = load_text(args.task_text, purpose="calibration")
    paths = build_cloze(text.text, text.source, out_dir / f"{args.name}-tasks", args.items, args.context,
                        args.answer, seed=0)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    analysis = analyze(loaded, AnalysisConfig(calib=args.calib, n_samples=args.samples))
    print(f"analysis {time.perf_counter() - t0:.1f} s", flush=True)
    ecfg = EvalConfig(data="wikitext2", seq_len=256, max_windows=args.eval_windows)
    text_cache, task_cache = NLLCache(), NLLCache()
    rows, seen = [], {}

    def judge(removed):
        if removed not in seen:
            view = pruned_view(loaded.model, list(removed))
            ppl = evaluate(view, loaded.tokenizer, ecfg).ppl
            acc = zero_shot(view, loaded.tokenizer, str(paths["heldout"])).by_task()["cloze_heldout"]
            seen[removed] = {"test_ppl": ppl, "heldout_acc": acc.acc, "heldout_acc_stderr": acc.acc_stderr,
                             "heldout_acc_norm": acc.acc_norm}
        return seen[removed]

    dense = judge(())
    print(f"dense: {dense}", flush=True)
    for n in [int(x) for x in args.ns.split(",")]:
        for label, cfg, cache in (("verified on text (default)", SelectConfig(n=n), text_cache),
                                  ("verified on task", SelectConfig(n=n, verify_on=str(paths["verify"])), task_cache),
                                  ("one pass", SelectConfig(n=n, verify_passes=0), None)):
            t = time.perf_counter()
            sel = select(analysis, cfg, model=loaded if cfg.verifies else None, cache=cache)
            secs = time.perf_counter() - t
            noise = paired_noise(loaded, analysis, cfg, sel) if label.startswith("verified on text") else None
            row = {"n": n, "method": label, "removed": list(sel.removed), "passes": sel.forward_passes, "noise": noise,
                   "select_seconds": secs, "verify_nll": sel.nll, "winner_source": sel.winner_source,
                   "task": sel.verification.get("task"), **judge(tuple(sel.removed))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"command": " ".join(sys.argv), "model": args.model, "calib": args.calib, "task_text": text.source,
              "items_per_half": args.items, "eval": f"wikitext2 test, {args.eval_windows} x 256 tokens",
              "dense": dense, "rows": rows}
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| n | method | removed | passes | test ppl | held-out acc | task acc (verify half) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        task = r["task"] or {}
        print(f"| {r['n']} | {r['method']} | {r['removed']} | {r['passes']} | {r['test_ppl']:.1f} | "
              f"{r['heldout_acc']:.3f} +- {r['heldout_acc_stderr']:.3f} | {task.get('winner_accuracy', '')} |")


if __name__ == "__main__":
    main()
