"""Text sources and calibration batches: deterministic, and clear errors for bad text."""

import json

import pytest
import torch

from mi_prun.data import calibration_tokens, load_text
from mi_prun.errors import MiPrunError
from mi_prun.testing import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_builtin_corpus_is_offline_and_large():
    text = load_text("builtin")
    assert len(text.text) > 100_000 and len(text.sha256) == 64


def test_same_seed_same_samples(tok):
    text = load_text("builtin")
    a = calibration_tokens(tok, text, 8, 64, seed=3)
    b = calibration_tokens(tok, text, 8, 64, seed=3)
    c = calibration_tokens(tok, text, 8, 64, seed=4)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.input_ids.shape == (8, 64)
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()  # BOS in front, as the tokenizer adds it
    assert a.provenance["sha256"] == text.sha256 and a.provenance["seed"] == 3


def test_file_jsonl_folder_and_string_sources(tmp_path, tok):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " * 5}) for i in range(10)))
    assert load_text(str(tmp_path / "a.txt")).text.startswith("alpha")
    assert "line 3" in load_text(str(tmp_path / "b.jsonl")).text
    folder = load_text(str(tmp_path))
    assert "alpha" in folder.text and "line 9" in folder.text
    assert load_text("text:hello there").text == "hello there"


def test_wikitext_from_local_folder(data_dir):
    valid = load_text("wikitext2", purpose="calibration")
    test = load_text("wikitext2", purpose="evaluation")
    assert valid.source == "wikitext2-valid-nounk" and test.source == "wikitext2-test"
    assert "<unk>" not in valid.text  # calibration text without the tokenised release's placeholders
    assert test.sha256.startswith("4f3e427e")


@pytest.mark.parametrize("content", ["", "   \n\t  "])
def test_empty_text_is_refused(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(MiPrunError, match="empty or only whitespace"):
        load_text(str(p))


def test_too_short_text_says_needed_and_found(tok):
    with pytest.raises(MiPrunError, match="need 252 text tokens, found 11"):
        calibration_tokens(tok, load_text("text:hello world"), 4, 64)


def test_undecodable_and_binary_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ".encode("latin-1") * 20)
    with pytest.raises(MiPrunError, match="not valid UTF-8"):
        load_text(str(bad))
    binary = tmp_path / "x.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(MiPrunError, match="binary"):
        load_text(str(binary))


def test_bad_jsonl_names_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(MiPrunError, match="line 2"):
        load_text(str(p))


def test_unknown_source():
    with pytest.raises(MiPrunError, match="not found"):
        load_text("no-such-source")


def test_wikitext2_valid_without_unk_placeholders(tmp_path, monkeypatch):
    from mi_prun.data import calibration_spec, load_text

    (tmp_path / "wikitext2-valid.tokens").write_text(" The <unk> lobster is a <unk> species . \n" * 3)
    monkeypatch.setenv("MI_PRUN_DATA_DIR", str(tmp_path))
    text = load_text("wikitext2-valid-nounk")
    assert text.source == "wikitext2-valid-nounk" and "<unk>" not in text.text
    assert text.text.startswith(" The lobster is a species .")
    assert calibration_spec({"source": text.source}) == "wikitext2-valid-nounk"  # verification reloads it


def test_wikitext2_means_the_text_without_placeholders(tmp_path, monkeypatch):
    """`wikitext2` calibrates on the validation split without `<unk>` (the text that ranks pruned
    models like the test split); the release as it is keeps an explicit name, and its old name
    `wikitext2-valid` still means it, so earlier commands and analyses reload the same text."""
    from mi_prun.data import calibration_spec, calibration_text, load_text

    (tmp_path / "wikitext2-valid.tokens").write_text(" The <unk> lobster is a <unk> species . \n" * 3)
    monkeypatch.setenv("MI_PRUN_DATA_DIR", str(tmp_path))
    default = load_text("wikitext2", purpose="calibration")
    assert default == load_text("wikitext2-valid-nounk") and "<unk>" not in default.text
    released = load_text("wikitext2-tokenised")
    assert released.source == "wikitext2-tokenised" and released.text.count("<unk>") == 6
    old = load_text("wikitext2-valid")
    assert old.text == released.text and old.source == "wikitext2-valid"
    for text in (default, released, old):  # verification and healing reload each from its record
        record = {"source": text.source, "sha256": text.sha256}
        assert calibration_spec(record) == text.source and calibration_text(record) == text
