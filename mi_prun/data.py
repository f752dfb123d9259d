"""Calibration and evaluation text, and its conversion to token batches.

Text sources (`load_text`):
  builtin            offline English corpus that every Python ships (`pydoc_data` topics)
  wikitext2          WikiText-2: the validation split for calibration, the raw test split for
                     evaluation (`purpose=`); also `wikitext2-valid` / `wikitext2-test` explicitly,
                     and `wikitext2-valid-nounk`: the validation split with its `<unk>`
                     placeholders dropped (closer to the raw test text). Read from `$MI_PRUN_DATA_DIR` (files `wikitext2-valid.tokens`,
                     `wikitext2-test.raw`) when set, else through the `datasets` library (online)
  <file>.txt|.md     UTF-8 text file
  <file>.jsonl       one JSON object per line; its "text" field is used
  <folder>           every .txt/.md file below it, sorted by path, joined by blank lines
  text:<string>      the string itself

`calibration_tokens` turns text into N samples x T tokens: the text is tokenised once, cut into
non-overlapping chunks of T tokens, and N chunks are drawn with a seeded generator, so the result
is deterministic for a seed and never reuses a token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mi_prun.config import calibration_spec
from mi_prun.errors import MiPrunError

log = logging.getLogger(__name__)

WIKITEXT_FILES = {"valid": "wikitext2-valid.tokens", "test": "wikitext2-test.raw"}
BUILTIN_SOURCES = ("builtin", "wikitext2", "wikitext2-valid", "wikitext2-valid-nounk", "wikitext2-test")
UNK = " <unk>"  # the tokenised release's placeholder for rare words
MAX_TEXT_BYTES = 200 * 1024 * 1024  # refuse files larger than this: calibration needs far less


@dataclass(frozen=True)
class Text:
    """Text plus where it came from (provenance goes into every report)."""

    text: str
    source: str
    sha256: str


def _make(text: str, source: str) -> Text:
    if not text or not text.strip():
        raise MiPrunError(f"calibration/evaluation text from {source!r} is empty or only whitespace. "
                          "Fix: give a source with real text.")
    return Text(text=text, source=source, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def builtin_text() -> str:
    """English prose from the Python documentation shipped with CPython (no download)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key].strip() for key in sorted(topics.topics))


def decode_bytes(raw: bytes, source: str) -> str:
    """UTF-8 text from bytes; binary or wrongly encoded input gets a clear error."""
    if b"\x00" in raw[:1 << 20]:
        raise MiPrunError(f"{source} looks binary (it contains NUL bytes). Fix: give a UTF-8 text file.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MiPrunError(f"{source} is not valid UTF-8 (byte {exc.start}: {exc.reason}). "
                          "Fix: convert it to UTF-8, e.g. `iconv -t utf-8`.") from exc


def parse_jsonl(text: str, source: str, field: str = "text") -> str:
    """Join the `field` of every JSON line; malformed lines are reported with their number."""
    parts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MiPrunError(f"{source} line {lineno} is not JSON ({exc.msg}). Fix: one JSON object per line.") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise MiPrunError(f"{source} line {lineno} has no string field {field!r}. "
                              f"Fix: write objects like {{\"{field}\": \"...\"}}.")
        parts.append(obj[field])
    return "\n\n".join(parts)


def _read_file(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise MiPrunError(f"{path} is {size / 2**20:.0f} MiB; the limit is {MAX_TEXT_BYTES / 2**20:.0f} MiB. "
                          "Fix: calibration needs a few hundred kB; give a smaller file.")
    try:  # read at most one byte past the limit: a file that grows meanwhile cannot flood memory
        with open(path, "rb") as fh:
            raw = fh.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise MiPrunError(f"cannot read {path}: {exc.strerror or exc}. Fix: check that the file exists "
                          "and that you may read it (chmod u+r).") from exc
    if len(raw) > MAX_TEXT_BYTES:
        raise MiPrunError(f"{path} is larger than the limit of {MAX_TEXT_BYTES / 2**20:.0f} MiB. "
                          "Fix: calibration needs a few hundred kB; give a smaller file.")
    text = decode_bytes(raw, str(path))
    if path.suffix.lower() == ".jsonl":
        text = parse_jsonl(text, str(path))
    return text


def data_dir() -> Path | None:
    """`$MI_PRUN_DATA_DIR` if set (a folder holding the WikiText-2 files), else None."""
    value = os.environ.get("MI_PRUN_DATA_DIR")
    return Path(value) if value else None


def wikitext2(split: str) -> str:
    """WikiText-2: `valid` (tokenised release, for calibration) or `test` (raw, for evaluation)."""
    folder = data_dir()
    if folder is not None:
        path = folder / WIKITEXT_FILES[split]
        if path.is_file():
            return decode_bytes(path.read_bytes(), str(path))
        log.warning("%s not found; trying the datasets library", path)
    try:
        import datasets  # type: ignore
    except ImportError:
        raise MiPrunError(
            "WikiText-2 is not available: $MI_PRUN_DATA_DIR does not hold "
            f"{WIKITEXT_FILES[split]} and the `datasets` library is not installed. Fix: set "
            "MI_PRUN_DATA_DIR to a folder with the WikiText-2 files, or `pip install datasets` "
            "(needs internet once), or use --calib builtin.") from None
    name = "wikitext-2-v1" if split == "valid" else "wikitext-2-raw-v1"
    try:
        ds = datasets.load_dataset("wikitext", name, split="validation" if split == "valid" else "test")
    except Exception as exc:  # offline, hub errors: all mean "not here"
        raise MiPrunError(f"could not load WikiText-2 through datasets ({type(exc).__name__}). Fix: "
                          "go online once, or set MI_PRUN_DATA_DIR to a local copy, or use --calib builtin.") from exc
    # The standard protocol joins the split's lines with blank lines.
    return "\n\n".join(ds["text"])


def load_text(source: str, purpose: str = "calibration") -> Text:
    """Text from a named source (see the module docstring). purpose: calibration | evaluation."""
    if purpose not in ("calibration", "evaluation"):
        raise ValueError(f"purpose must be calibration or evaluation, not {purpose!r}")
    if source is None or not str(source).strip():
        raise MiPrunError("no text source given. Fix: use builtin, wikitext2, a file, a folder or text:<string>.")
    source = str(source)
    if source.startswith("text:"):
        return _make(source[len("text:"):], "text:<string>")
    if source == "builtin":
        return _make(builtin_text(), "builtin:pydoc_data")
    if source == "wikitext2-valid-nounk":
        # The validation split with its `<unk>` placeholders dropped: closer to the raw text the
        # test split is evaluated on (the raw validation split needs `datasets`, online). Measured:
        # NLL on it ranks pruned models in the test split's order, NLL on the release with <unk>
        # does not (benchmarks/RESULTS.md, "Verified search").
        return _make(wikitext2("valid").replace(UNK, ""), "wikitext2-valid-nounk")
    if source in ("wikitext2", "wikitext2-valid", "wikitext2-test"):
        split = source.split("-")[1] if "-" in source else ("valid" if purpose == "calibration" else "test")
        return _make(wikitext2(split), f"wikitext2-{split}")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md", ".jsonl"))
        if not files:
            raise MiPrunError(f"folder {path} holds no .txt, .md or .jsonl files. Fix: put text files in it.")
        return _make("\n\n".join(_read_file(p) for p in files), f"folder:{path}")
    if path.is_file():
        return _make(_read_file(path), f"file:{path}")
    if path.exists():  # /dev/zero, a FIFO, a socket: reading could block or never end
        raise MiPrunError(f"text source {source!r} is not a regular file (a device, FIFO or socket). "
                          "Fix: save the text to a file and give its path.")
    raise MiPrunError(f"text source {source!r} not found: it is no file or folder and not one of "
                      f"{', '.join(BUILTIN_SOURCES)}, text:<string>.")


@dataclass(frozen=True)
class Calibration:
    """N samples x T tokens for capture. `provenance` goes into the analysis report."""

    input_ids: torch.Tensor  # (N, T) long
    attention_mask: torch.Tensor  # (N, T) long, all ones (no padding)
    provenance: dict[str, Any]

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of encoded text by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The text as one stream of token ids, without special tokens: (n_tokens,) long."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(tokenizer: Any, text: Text, n_samples: int, seq_len: int, seed: int = 0,
                       add_bos: bool | None = None) -> Calibration:
    """N x T token samples drawn without overlap from `text`, deterministic for `seed`.

    With BOS (the tokenizer's default, or `add_bos=True`) each sample is BOS + T-1 text tokens, as
    the model sees text in use. Too little text raises an error with tokens needed and found.
    """
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise MiPrunError(f"number of samples must be a positive integer, got {n_samples!r}.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise MiPrunError(f"tokens per sample must be an integer >= 2, got {seq_len!r}.")
    use_bos = adds_bos(tokenizer) if add_bos is None else add_bos
    body = seq_len - 1 if use_bos else seq_len
    stream = tokenize(tokenizer, text.text)
    n_chunks = stream.numel() // body
    if n_chunks < n_samples:
        raise MiPrunError(
            f"not enough calibration text in {text.source}: {n_samples} samples x {seq_len} tokens need "
            f"{n_samples * body} text tokens, found {stream.numel()}. Fix: give more text, or fewer "
            "or shorter samples.")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_chunks, generator=gen)[:n_samples].sort().values
    chunks = stream[: n_chunks * body].view(n_chunks, body)[chosen]
    if use_bos:
        bos = torch.full((n_samples, 1), tokenizer.bos_token_id, dtype=torch.long)
        chunks = torch.cat([bos, chunks], dim=1)
    provenance = {
        "source": text.source, "sha256": text.sha256, "n_samples": n_samples, "seq_len": seq_len,
        "seed": seed, "bos": use_bos, "text_tokens": int(stream.numel()),
        "chunks_available": int(n_chunks),
    }
    return Calibration(input_ids=chunks.contiguous(), attention_mask=torch.ones_like(chunks), provenance=provenance)


def calibration_text(calibration: dict[str, Any]) -> Text:
    """The calibration text an analysis was captured on, reloaded from its provenance
    (`analysis.calibration`) and checked against the recorded sha256."""
    source = str(calibration.get("source") or "")
    spec = calibration_spec(calibration)
    if spec is None:
        raise MiPrunError(f"the calibration text {source or '(unrecorded)'!r} cannot be reloaded from the "
                          "analysis. Fix: pass verification tokens explicitly (tokens=...), or skip "
                          "verification (verify_passes=0, --verify-passes 0).")
    text = load_text(spec, purpose="calibration")
    if calibration.get("sha256") and text.sha256 != calibration["sha256"]:
        raise MiPrunError(f"the calibration text {source} changed since the analysis (sha256 differs). "
                          "Fix: restore it, or pass verification tokens explicitly (tokens=...).")
    return text


def verification_tokens(tokenizer: Any, text: Text, calibration: dict[str, Any], n_samples: int,
                        seq_len: int) -> Calibration:
    """N x T token samples of `text` that share no token with the capture's samples.

    `calibration` is the capture's provenance (`analysis.calibration`: seed, n_samples, seq_len,
    bos). With the capture's sample length the chunks are the rest of the capture's permutation
    (`randperm(n_chunks)` with its seed, after its first n_samples); with another length a
    permutation of the new chunk grid (same seed) is filtered to chunks overlapping no captured
    chunk. Deterministic; too little text raises an error with the tokens needed and found.
    """
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise MiPrunError(f"number of verification samples must be a positive integer, got {n_samples!r}.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise MiPrunError(f"verification tokens per sample must be an integer >= 2, got {seq_len!r}.")
    if calibration.get("sha256") and text.sha256 != calibration["sha256"]:
        raise MiPrunError(f"{text.source} is not the text the analysis was captured on (sha256 differs). "
                          "Fix: give the analysis's calibration text.")
    use_bos = bool(calibration.get("bos", adds_bos(tokenizer)))
    seed, n_cap, len_cap = int(calibration.get("seed", 0)), int(calibration["n_samples"]), int(calibration["seq_len"])
    stream = tokenize(tokenizer, text.text)
    body_cap, body = (len_cap - 1, seq_len - 1) if use_bos else (len_cap, seq_len)
    n_cap_chunks = stream.numel() // body_cap
    captured = torch.randperm(n_cap_chunks, generator=torch.Generator().manual_seed(seed))
    if body == body_cap:
        order = captured[n_cap:].tolist()
    else:
        used = torch.zeros(stream.numel(), dtype=torch.bool)
        for c in captured[:n_cap].tolist():
            used[c * body_cap:(c + 1) * body_cap] = True
        n_chunks = stream.numel() // body
        perm = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed)).tolist()
        order = [c for c in perm if not used[c * body:(c + 1) * body].any()]
    if len(order) < n_samples:
        raise MiPrunError(
            f"not enough calibration text in {text.source} for verification: {n_samples} samples x "
            f"{seq_len} tokens apart from the capture's {n_cap} x {len_cap} need about "
            f"{(n_samples * body + n_cap * body_cap):,} text tokens; {len(order)} free chunks of {body} "
            f"found in {stream.numel():,}. Fix: fewer or shorter verification samples (--verify-samples, "
            "--verify-tokens), more text, or no verification (--verify-passes 0).")
    chosen = torch.tensor(sorted(order[:n_samples]), dtype=torch.long)
    chunks = stream[: (stream.numel() // body) * body].view(-1, body)[chosen]
    if use_bos:
        bos = torch.full((n_samples, 1), tokenizer.bos_token_id, dtype=torch.long)
        chunks = torch.cat([bos, chunks], dim=1)
    provenance = {"source": text.source, "sha256": text.sha256, "n_samples": n_samples, "seq_len": seq_len,
                  "seed": seed, "bos": use_bos, "purpose": "verification",
                  "disjoint_from": {"n_samples": n_cap, "seq_len": len_cap},
                  "chunks": chosen.tolist()}
    return Calibration(input_ids=chunks.contiguous(), attention_mask=torch.ones_like(chunks), provenance=provenance)
