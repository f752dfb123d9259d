"""Evaluation: perplexity follows its documented protocol (checked by hand on a tiny model),
errors say what is needed, and nothing here changes the model."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from mi_prun.errors import MiPrunError
from mi_prun.evaluate import PerplexityResult, generate_sample, perplexity
from mi_prun.models import find_blocks, pruned_view
from mi_prun.speed import compare_speed, size_and_speed
from mi_prun.testing import tiny_model

# 17 ASCII bytes: the byte tokenizer maps each to one token id equal to the byte.
TEXT = "hello, pruned lm!"
BOS = 256


def state(model: torch.nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict(),
            [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)],
            len(find_blocks(model)), model.training)


def assert_same_state(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def manual_nll(model: torch.nn.Module, windows: list[list[int]], scored_from: int) -> tuple[float, int]:
    """Sum of -log p over positions >= scored_from of each window, from log_softmax by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = F.log_softmax(model(torch.tensor([w])).logits[0].double(), dim=-1)
            for pos in range(max(scored_from, 1), len(w)):
                total -= logp[pos - 1, w[pos]].item()
                count += 1
    return total, count


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_perplexity_with_bos_matches_hand_computation(llama):
    model, tok = llama
    ids = list(TEXT.encode())
    assert tok(TEXT, add_special_tokens=False).input_ids == ids
    # seq_len 8 with BOS: windows [BOS t0..t6] [BOS t7..t13]; t14..t16 dropped; 14 tokens scored.
    total, count = manual_nll(model, [[BOS] + ids[0:7], [BOS] + ids[7:14]], scored_from=1)
    result = perplexity(model, tok, TEXT, seq_len=8, batch_size=1)
    assert isinstance(result, PerplexityResult)
    assert result.bos is True and "BOS" in result.protocol
    assert (result.windows, result.tokens_scored, result.seq_len) == (2, 14, 8) and count == 14
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    # Batching does not change the figure.
    assert perplexity(model, tok, TEXT, seq_len=8, batch_size=4).nll == pytest.approx(result.nll, rel=1e-6)


def test_perplexity_without_bos_matches_hand_computation(llama):
    model, tok = llama
    ids = list(TEXT.encode())
    # seq_len 8 without BOS: windows [t0..t7] [t8..t15]; first token of each is context only.
    total, count = manual_nll(model, [ids[0:8], ids[8:16]], scored_from=1)
    result = perplexity(model, tok, TEXT, seq_len=8, add_bos=False)
    assert result.bos is False and "not scored" in result.protocol
    assert (result.windows, result.tokens_scored) == (2, 14) and count == 14
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert perplexity(model, tok, TEXT, seq_len=8, add_bos=False, max_windows=1).windows == 1


def test_the_head_scores_a_batch_in_row_chunks_that_fit_and_gives_the_same_numbers(llama, monkeypatch):
    """A large vocabulary's logits are never held for a whole batch (Gemma 3: 268 MB per row of 256
    tokens): the head runs on as many rows as fit in HEAD_BYTES, and every row's NLL is unchanged,
    padded rows included."""
    from mi_prun.evaluate import token_nll_rows
    from mi_prun.runtime import BlockRunner

    model, _ = llama
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[4, :3] = 0
    whole = token_nll_rows(model, ids, mask, batch_size=5)
    seen = []
    head = BlockRunner._head

    def counting(self, h, ids_, mask_):
        seen.append(int(ids_.shape[0]))
        return head(self, h, ids_, mask_)

    monkeypatch.setattr(BlockRunner, "_head", counting)
    vocab = model.get_output_embeddings().out_features
    monkeypatch.setattr(BlockRunner, "HEAD_BYTES", 2 * 12 * vocab * 4)  # two rows' logits
    parts = token_nll_rows(model, ids, mask, batch_size=5)
    assert seen == [2, 2, 1]
    assert torch.equal(parts[1], whole[1])
    assert torch.allclose(parts[0], whole[0], rtol=1e-6, atol=1e-6)
    seen.clear()
    monkeypatch.setattr(BlockRunner, "HEAD_BYTES", 1)  # not even one row fits: one row at a time
    ones = token_nll_rows(model, ids, mask, batch_size=5)
    assert seen == [1] * 5 and torch.allclose(ones[0], whole[0], rtol=1e-6, atol=1e-6)


def test_perplexity_errors(llama):
    model, tok = llama
    with pytest.raises(MiPrunError, match=r"too short.*255 tokens needed.*17 found"):
        perplexity(model, tok, TEXT, seq_len=256)
    with pytest.raises(MiPrunError, match=r"exceeds the model's context of 256"):
        perplexity(model, tok, TEXT * 100, seq_len=512)
    with pytest.raises(MiPrunError, match="at least 2"):
        perplexity(model, tok, TEXT, seq_len=1)


def test_model_unchanged_by_evaluation_even_when_it_fails(llama):
    model, tok = llama
    before = state(model)
    stages = []
    perplexity(model, tok, TEXT * 4, seq_len=16, batch_size=2,
               progress=lambda s, f, m: stages.append((s, f)))
    assert stages == [("perplexity", 0.0), ("perplexity", 0.5), ("perplexity", 1.0)]  # 0.0: the shell's clock starts

    def explode(stage, fraction, message):
        raise RuntimeError("callback failed")
    with pytest.raises(RuntimeError, match="callback failed"):
        perplexity(model, tok, TEXT * 4, seq_len=16, batch_size=1, progress=explode)
    view = pruned_view(model, [2, 3])
    perplexity(view, tok, TEXT * 4, seq_len=16)
    generate_sample(view, tok, "ab", max_new_tokens=4)
    assert_same_state(state(model), before)
    assert torch.is_grad_enabled()


def test_generate_sample_is_greedy_and_deterministic(llama):
    model, tok = llama
    a = generate_sample(model, tok, "hello", max_new_tokens=6)
    assert isinstance(a, str) and a == generate_sample(model, tok, "hello", max_new_tokens=6)


def test_size_speed_and_compare(llama, tmp_path):
    model, tok = llama
    info = size_and_speed(model, tok, prompt_tokens=8, decode_tokens=2, repeats=1)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["bytes"] == 4 * info["parameters"]  # float32
    assert info["prefill_tokens_per_s"] > 0 and info["decode_tokens_per_s"] > 0
    tied, _ = tiny_model("gemma", n_layers=2)
    emb = tied.get_input_embeddings().weight
    assert size_and_speed(tied, prompt_tokens=4, decode_tokens=1, repeats=1)["parameters"] == \
        sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
    assert tied.get_output_embeddings().weight is emb
    view = pruned_view(model, [0, 1, 2])
    cmp = compare_speed(model, view, tok, prompt_tokens=8, decode_tokens=2, repeats=1)
    assert cmp["param_ratio"] < 1 and cmp["bytes_ratio"] == pytest.approx(cmp["param_ratio"])
    assert cmp["prefill_speedup"] > 0 and cmp["decode_speedup"] > 0


# ----------------------------------------------------------------------------------------------
# real model


@pytest.fixture(scope="module")
def smollm2():
    from mi_prun.runtime import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.mark.real_model
def test_dense_smollm2_wikitext2_perplexity_is_sane(smollm2):
    path = Path(os.environ.get("MI_PRUN_DATA_DIR", "../shared/data")) / "wikitext2-test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not found (set MI_PRUN_DATA_DIR)")
    text = path.read_text(encoding="utf-8")
    before = copy.deepcopy(smollm2.model.config.to_dict())
    result = perplexity(smollm2.model, smollm2.tokenizer, text, seq_len=256, max_windows=8)
    print(f"\nsmollm2-135m dense WikiText-2 ppl {result.ppl:.2f} ({result.protocol})")
    assert 10 < result.ppl < 200
    assert result.windows == 8 and result.tokens_scored == 8 * 255
    assert smollm2.model.config.to_dict() == before
