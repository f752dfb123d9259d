"""The built-in model end to end: loads offline through the zoo, talks sense, captures."""

import pytest
import torch

from mi_prun.capture import capture, count_hooks
from mi_prun.data import calibration_tokens, load_text

pytestmark = pytest.mark.real_model


def test_smollm2_knows_paris(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    assert smollm2.n_blocks == 30 and smollm2.model_type == "llama"
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0][ids.input_ids.shape[1]:])
    assert "Paris" in text, text


def test_smollm2_capture_2x32(smollm2):
    cal = calibration_tokens(smollm2.tokenizer, load_text("builtin"), 2, 32, seed=0)
    cap = capture(smollm2.model, cal.input_ids, max_positions=48)
    assert cap.hidden.shape == (31, 48, 576)
    assert torch.isfinite(cap.hidden).all()
    assert count_hooks(smollm2.model) == 0


def test_fbs_gap_to_exact_on_smollm2(smollm2):
    """FBS against the exact optimum on the built-in model's span matrix, n = 2..10 (the numbers
    are a report, printed with -s; the test asserts the report exists and every gap is finite)."""
    from mi_prun.pipeline import AnalysisConfig, analyze
    from mi_prun.select import compare

    analysis = analyze(smollm2, AnalysisConfig(calib="builtin", n_samples=4, seq_len=64, max_positions=512))
    report = []
    for n in range(2, 11):
        rows = {r["method"]: r for r in compare(analysis, n=n, methods=("fbs", "exact"), run_cost="neg-log-nmi")}
        assert rows["exact"]["gap"] == 0
        gap = rows["fbs"]["gap"]
        assert gap is not None and gap == gap and gap >= -1e-9 and gap != float("inf")
        report.append((n, rows["fbs"]["objective"], rows["exact"]["objective"], rows["fbs"]["rel_gap"]))
    print("\n n  fbs  exact  rel_gap")
    for n, f, e, g in report:
        print(f"{n:2d} {f:.4f} {e:.4f} {g:.3f}")
    assert len(report) == 9
