"""Capture: shapes for every family, exact values, hooks always removed, determinism, bounded memory."""

import pytest
import torch

from mi_prun.capture import capture, choose_positions
from mi_prun.models.blocks import find_blocks
from mi_prun.models.hooks import count_hooks, output_hooks
from mi_prun.data import calibration_tokens, load_text
from mi_prun.errors import NonFiniteError
from mi_prun.testing import FAMILIES, tiny_model


@pytest.fixture(scope="module")
def text():
    return load_text("builtin")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shapes_and_values_match_hidden_states(family, text):
    model, tok = tiny_model(family, n_layers=4)
    cal = calibration_tokens(tok, text, 4, 24, seed=0)
    cap = capture(model, cal.input_ids, max_positions=50, batch_size=3)
    assert cap.hidden.shape == (5, 50, model.config.hidden_size if hasattr(model.config, "hidden_size") else 32)
    assert cap.hidden.dtype == torch.float32
    assert count_hooks(model) == 0
    # h_b for b < L equal transformers' own hidden_states (the last one there is after the final norm).
    ref = model(cal.input_ids, output_hidden_states=True).hidden_states
    for b in range(4):
        torch.testing.assert_close(cap.hidden[b], ref[b][cap.sample_index, cap.position])


def test_first_position_dropped_and_padding_excluded():
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    rows = choose_positions(mask, m=1000, drop_first=True, seed=0)
    assert (rows[:, 1] > 0).all()
    assert not ((rows[:, 0] == 1) & (rows[:, 1] >= 4)).any()
    assert rows.shape[0] == 3 * 5 - 2
    rows_all = choose_positions(mask, m=1000, drop_first=False, seed=0)
    assert rows_all.shape[0] == 16


def test_no_hook_survives_an_exception():
    model, tok = tiny_model("llama", n_layers=3)
    ids = torch.randint(0, 250, (2, 10))

    def boom(b, output):
        if b == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with output_hooks(dict(enumerate(find_blocks(model).blocks)), boom):
            model(ids)
    assert count_hooks(model) == 0


def test_keyboard_interrupt_leaves_no_hooks():
    model, _ = tiny_model("llama", n_layers=3)
    ids = torch.randint(0, 250, (4, 10))

    def interrupt(stage, frac, msg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture(model, ids, batch_size=1, progress=interrupt)
    assert count_hooks(model) == 0


def test_same_seed_same_capture(text):
    model, tok = tiny_model("mistral", n_layers=3)
    cal = calibration_tokens(tok, text, 6, 20, seed=1)
    a = capture(model, cal.input_ids, max_positions=40, seed=7, batch_size=2)
    b = capture(model, cal.input_ids, max_positions=40, seed=7, batch_size=4)
    assert torch.equal(a.sample_index, b.sample_index) and torch.equal(a.position, b.position)
    torch.testing.assert_close(a.hidden, b.hidden)


def test_memory_is_bounded_by_positions_not_tokens(text):
    model, tok = tiny_model("llama", n_layers=3)
    small = calibration_tokens(tok, text, 4, 64, seed=0)
    large = calibration_tokens(tok, text, 16, 64, seed=0)  # four times the tokens
    a = capture(model, small.input_ids, max_positions=128)
    b = capture(model, large.input_ids, max_positions=128)
    assert a.hidden.numel() == b.hidden.numel() == 4 * 128 * 32
    assert b.tokens_seen == 4 * a.tokens_seen


def test_non_finite_hidden_states_name_the_block():
    model, _ = tiny_model("llama", n_layers=4)
    ids = torch.randint(0, 250, (2, 8))
    with torch.no_grad():  # an overflowing block, as in half precision
        model.model.layers[2].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="block 2.*float32") as info:
        capture(model, ids)
    assert info.value.block == 2
    assert count_hooks(model) == 0


def test_capture_never_hooks_the_callers_model():
    """Another thread running the shared model meanwhile must not see the capture's hooks."""
    model, _ = tiny_model("llama", n_layers=3)
    ids = torch.randint(0, 250, (2, 8))
    seen = []

    def spy(stage, frac, msg):
        seen.append(count_hooks(model))

    capture(model, ids, batch_size=1, progress=spy)
    assert seen and max(seen) == 0
