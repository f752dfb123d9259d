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
