"""Calibration and evaluation text, and its conversion to token batches.

Text sources (`load_text`):
  builtin            offline English corpus that every Python ships (`pydoc_data` topics)
  wikitext2          WikiText-2: for calibration the validation split without the `<unk>`
                     placeholders of its tokenised release (`wikitext2-valid-nounk`, the text whose
                     NLL ranks pruned models like the test split does); for evaluation the raw test
                     split (`wikitext2-test`); `purpose=` decides
  wikitext2-tokenised the validation split as released, with `<unk>` for 5 % of its words (what
                     `wikitext2` meant for calibration before; `wikitext2-valid` is its old name,
                     kept so earlier commands and analyses mean what they meant)
                     All read from `$MI_PRUN_DATA_DIR` (files `wikitext2-valid.tokens`,
                     `wikitext2-test.raw`) when set, else through the `datasets` library (online)
  <file>.txt|.md     UTF-8 text file
  <file>.jsonl       one JSON object per line; its "text" field is used
  <file>.json        an array of records (`[{"text": ...}, ...]`, as `datasets` exports them)
  <folder>           every .txt/.md/.jsonl file below it, sorted by path, joined by blank lines
                     (a subfolder that cannot be read is refused, never skipped)
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
from typing import Any, Iterator

import torch

from mi_prun.config import calibration_spec
from mi_prun.errors import MiPrunError, NotEnoughText
from mi_prun.files import check_path_length, parse_json

log = logging.getLogger(__name__)

WIKITEXT_FILES = {"valid": "wikitext2-valid.tokens", "test": "wikitext2-test.raw"}
BUILTIN_SOURCES = ("builtin", "wikitext2", "wikitext2-valid-nounk", "wikitext2-tokenised", "wikitext2-valid",
                   "wikitext2-test")
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
    from pydoc_data import topics  # optional: some Python builds ship without pydoc_data

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


def parse_json_records(text: str, source: str, field: str = "text") -> str:
    """The `field` of every object of a `.json` file holding an array of records (as `datasets`
    writes them: `[{"text": ...}, ...]`), joined by blank lines; a list of strings is joined too."""
    try:
        data = parse_json(text)
    except json.JSONDecodeError as exc:
        raise MiPrunError(f"{source} is not JSON ({exc.msg}). Fix: give an array of objects like "
                          f"[{{\"{field}\": \"...\"}}], or rename it to .txt to read it as plain text.") from exc
    records = data.get("data", data.get("rows")) if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise MiPrunError(f"{source} holds a JSON {type(data).__name__}, not an array of records. Fix: give "
                          f"[{{\"{field}\": \"...\"}}, ...], or rename it to .txt to read it as plain text.")
    parts = []
    for i, rec in enumerate(records):
        value = rec if isinstance(rec, str) else rec.get(field) if isinstance(rec, dict) else None
        if not isinstance(value, str):
            raise MiPrunError(f"{source} record {i} has no string field {field!r}. "
                              f"Fix: write objects like {{\"{field}\": \"...\"}}.")
        parts.append(value)
    return "\n\n".join(parts)


def parse_jsonl(text: str, source: str, field: str = "text") -> str:
    """Join the `field` of every JSON line; malformed lines are reported with their number."""
    parts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
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
    elif path.suffix.lower() == ".json":
        text = parse_json_records(text, str(path))
    return text


TEXT_SUFFIXES = (".txt", ".md", ".jsonl")  # what a folder source reads


def folder_files(folder: Path) -> list[Path]:
    """The text files below `folder`, sorted by path. A subfolder that cannot be listed is refused
    (`MiPrunError` naming it), never skipped: half a folder recorded as the whole would be a
    different calibration set under the same name."""
    def refuse(exc: OSError) -> None:
        raise MiPrunError(f"cannot read {exc.filename or folder}: {exc.strerror or exc}. Fix: make it "
                          f"readable (chmod u+rx) or move it out of {folder}.") from exc

    files = []
    for root, _dirs, names in os.walk(folder, onerror=refuse):
        files += [Path(root) / n for n in names if Path(n).suffix.lower() in TEXT_SUFFIXES]
    return sorted(p for p in files if p.is_file())


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
        import datasets  # type: ignore  # optional dependency (mi-prun[data])
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


def check_text_source(source: Any, what: str = "text source") -> None:
    """The cheap part of `load_text`: a named source, `text:...`, or a path that exists and is a
    regular file or a folder; nothing is read. Commands run it before loading the model, so that a
    missing file is found first, not after minutes of work."""
    if source is None or not str(source).strip():
        raise MiPrunError(f"no {what} given. Fix: use builtin, wikitext2, a file, a folder or text:<string>.")
    source = str(source)
    if source.startswith("text:") or source in BUILTIN_SOURCES:
        return
    check_path_length(source, what)
    path = Path(source).expanduser()
    if path.is_dir() or path.is_file():
        return
    if path.exists():
        raise MiPrunError(f"{what} {source!r} is not a regular file (a device, FIFO or socket). Fix: save the text to "
                          "a file and give its path.")
    raise MiPrunError(f"{what} {source!r} not found: it is no file or folder and not one of "
                      f"{', '.join(BUILTIN_SOURCES)}, text:<string>. Fix: give an existing file or a named source.")


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
    if source == "wikitext2":
        source = "wikitext2-valid-nounk" if purpose == "calibration" else "wikitext2-test"
    if source == "wikitext2-valid-nounk":
        # The validation split with its `<unk>` placeholders dropped: closer to the raw text the
        # test split is evaluated on, and the same offline and through `datasets`. Measured: NLL on
        # it ranks pruned models in the test split's order, NLL on the release with <unk> does not
        # (benchmarks/RESULTS.md, "Verified search").
        return _make(wikitext2("valid").replace(UNK, ""), "wikitext2-valid-nounk")
    if source in ("wikitext2-tokenised", "wikitext2-valid"):  # the release as it is, with <unk>
        return _make(wikitext2("valid"), source)
    if source == "wikitext2-test":
        return _make(wikitext2("test"), "wikitext2-test")
    check_path_length(source, "text source")
    path = Path(source).expanduser()
    if path.is_dir():
        files = folder_files(path)
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


# A tokenizer call holds about 200 bytes per character of its input (offsets, token strings,
# Python ints): 22 MB of text took 4.5 GB. Texts up to WHOLE_TOKENIZE_CHARS are tokenised in one
# call, as every result so far was; longer ones piece by piece (`text_pieces`), so the peak is the
# text, its ids and one piece's overhead (measured in docs/RELIABILITY.md).
WHOLE_TOKENIZE_CHARS = 2 * 2**20
TOKENIZE_PIECE_CHARS = 2**20


def text_pieces(text: str, size: int | None = None) -> Iterator[str]:
    """Consecutive pieces of `text` of at most `size` characters (default `TOKENIZE_PIECE_CHARS`)
    that join to `text`, each cut just before a newline (else before a space) so that no word is
    split between two pieces."""
    size = TOKENIZE_PIECE_CHARS if size is None else size
    start, n = 0, len(text)
    while start < n:
        end = min(n, start + size)
        if end < n:
            cut = text.rfind("\n", start + 1, end)
            if cut <= start:
                cut = text.rfind(" ", start + 1, end)
            if cut > start:
                end = cut
        yield text[start:end]
        start = end


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The text as one stream of token ids, without special tokens: (n_tokens,) long. A text over
    `WHOLE_TOKENIZE_CHARS` is tokenised in `text_pieces` (bounded memory per call)."""
    def ids_of(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False, return_attention_mask=False, verbose=False).input_ids

    if len(text) <= WHOLE_TOKENIZE_CHARS:
        return torch.tensor(ids_of(text), dtype=torch.long)
    parts: list[torch.Tensor | None] = [torch.tensor(ids_of(p), dtype=torch.int32) for p in text_pieces(text)]
    out = torch.empty(sum(int(p.numel()) for p in parts if p is not None), dtype=torch.long)
    pos = 0
    for i, part in enumerate(parts):  # copied into place one by one: never two full copies at once
        assert part is not None
        out[pos:pos + part.numel()] = part
        pos += int(part.numel())
        parts[i] = None
    return out


def as_tokenizer(tokenizer: Any, what: str = "tokenizer") -> Any:
    """A tokenizer: itself, or the tokenizer of a `LoadedModel`; `MiPrunError` for None, a str or
    a model given in its place."""
    if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "model"):  # a LoadedModel
        return tokenizer.tokenizer
    if tokenizer is None or isinstance(tokenizer, (str, bytes, torch.nn.Module)) or not callable(tokenizer):
        raise MiPrunError(f"{what} must be a tokenizer, got {type(tokenizer).__name__}. Fix: pass the "
                          "tokenizer of mi_prun.load_model(spec) (its .tokenizer) or the LoadedModel itself.")
    return tokenizer


def as_text(text: Any) -> Text:
    """A `Text`: itself, or a str wrapped as inline text; `MiPrunError` for anything else."""
    if isinstance(text, Text):
        return text
    if isinstance(text, str):
        return _make(text, "text:<string>")
    raise MiPrunError(f"text must be a mi_prun.data.Text or a str, got {type(text).__name__}. Fix: pass "
                      "mi_prun.load_text(source).")


PLACEHOLDERS = ("<unk>", "<UNK>", "[UNK]")  # what tokenised corpora write for words they dropped
PLACEHOLDER_WARN_RATE = 0.01  # above 1 % of words or tokens, the text is not what the model reads in use
_warned: set[str] = set()  # texts already warned about (by digest): one warning per text and process


def placeholder_rate(tokenizer: Any, text: str, stream: torch.Tensor) -> dict[str, float]:
    """How much of `text` is placeholder rather than language: the share of its words that are a
    literal placeholder (`<unk>`, as in WikiText-2's tokenised release: 5 %), and the share of its
    tokens that are the tokenizer's unknown token."""
    words = max(len(text.split()), 1)
    literal = sum(text.count(p) for p in PLACEHOLDERS)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unknown = float((stream == unk_id).float().mean()) if isinstance(unk_id, int) and stream.numel() else 0.0
    return {"placeholder_words": literal / words, "unknown_tokens": unknown}


def warn_placeholders(text: Text, rates: dict[str, float]) -> None:
    """Say, once per text, when it is full of placeholders: capture and verification on it measure
    the model on `<unk>`, and misrank removed sets (measured: a loss 18 % higher at n = 2 than the
    set the placeholder-free text picks)."""
    worst = max(rates.values(), default=0.0)
    if worst <= PLACEHOLDER_WARN_RATE or text.sha256 in _warned:
        return
    _warned.add(text.sha256)
    what = (f"{rates['placeholder_words']:.1%} of its words are placeholders such as <unk>"
            if rates["placeholder_words"] >= rates["unknown_tokens"] else
            f"{rates['unknown_tokens']:.1%} of its tokens are the tokenizer's unknown token")
    log.warning("calibration text %s: %s, so the model is measured on placeholders, not language, and removed "
                "sets can be misranked. Fix: use text without them (wikitext2 is the validation split with its "
                "<unk> dropped; for a file: sed 's/ <unk>//g').", text.source, what)


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
    tokenizer, text = as_tokenizer(tokenizer), as_text(text)
    use_bos = adds_bos(tokenizer) if add_bos is None else add_bos
    body = seq_len - 1 if use_bos else seq_len
    stream = tokenize(tokenizer, text.text)
    warn_placeholders(text, placeholder_rate(tokenizer, text.text, stream))
    n_chunks = stream.numel() // body
    if n_chunks < n_samples:
        raise NotEnoughText(
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
        raise NotEnoughText(
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
