"""Refuse a model that cannot fit before spending minutes loading it.

`weights_bytes` tells, from file headers only (no weights read), how many bytes the weights of a
folder, a GGUF file or a cached Hugging Face id will take at a dtype; `check_memory` compares that
with the free memory of the device (`available_memory`) and raises a `MiPrunError` with the ways
out when it cannot fit.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path

import torch
from gguf import GGUFReader
from huggingface_hub import try_to_load_from_cache

from mi_prun.errors import MiPrunError
from mi_prun.files import parse_json

log = logging.getLogger(__name__)

# Loading needs the weights plus working room (buffers, the tokenizer, the first forward pass).
MEMORY_HEADROOM = 1.1
SKIP_MEMORY_CHECK_ENV = "MI_PRUN_SKIP_MEMORY_CHECK"

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes that loading casts to `dtype`


def _safetensors_numels(path: Path) -> list[tuple[str, int, int]]:
    """(dtype, numel, stored bytes) of every tensor, read from the header only (no weights)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("header too small")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100 * 2**20:
            raise ValueError("header too large")
        header = parse_json(fh.read(n))
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for dim in entry["shape"]:
            numel *= int(dim)
        start, end = entry["data_offsets"]
        out.append((str(entry["dtype"]), numel, int(end) - int(start)))
    return out


def _gguf_numel(path: Path) -> int:
    """Number of weights in a GGUF file (the reader maps the file; no tensor data is read)."""
    return sum(int(tensor.n_elements) for tensor in GGUFReader(path).tensors)


def weights_bytes(source: str | os.PathLike, gguf_file: str | os.PathLike | None,
                  dtype: torch.dtype) -> int | None:
    """Bytes the weights of `source` will take in memory at `dtype`, from file headers only.

    A local folder: safetensors headers (floating tensors counted at `dtype`), else the size of
    `.bin`/`.pt` files. A GGUF file (`gguf_file` inside folder `source`): its tensor sizes,
    dequantised to `dtype`. A Hugging Face id: the same from the local cache when the files are
    there. None when the size is unknown (the check is then skipped, never guessed).
    """
    source = os.fspath(source)
    itemsize = torch.empty((), dtype=dtype).element_size()
    try:
        if gguf_file is not None:
            return _gguf_numel(Path(source) / gguf_file) * itemsize
        folder = Path(source)
        if not folder.is_dir():
            for name in ("model.safetensors.index.json", "model.safetensors", "config.json"):
                hit = try_to_load_from_cache(source, name)
                if isinstance(hit, str):
                    folder = Path(hit).parent
                    break
            else:
                return None
        files = sorted(folder.glob("*.safetensors"))
        if files:
            total = 0
            for f in files:
                for dt, numel, stored in _safetensors_numels(f):
                    total += numel * itemsize if dt in _FLOAT_DTYPES else stored
            return total
        files = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        return sum(f.stat().st_size for f in files) or None
    except Exception as exc:  # unreadable header: leave the verdict to the loader's own error
        log.debug("cannot estimate the size of %s: %s", source, exc)
        return None


def available_memory(device: torch.device) -> int | None:
    """Free bytes where the weights will live: GPU memory for cuda, RAM for cpu; None if unknown."""
    try:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        if device.type == "cpu":
            try:
                import psutil  # optional: not a dependency of mi-prun

                return int(psutil.virtual_memory().available)
            except ImportError:
                return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except Exception as exc:
        log.debug("cannot tell the free memory of %s: %s", device, exc)
    return None


def fits(need: int | None, device: torch.device) -> bool:
    """Whether `need` bytes (with headroom) fit in the free memory of `device`; True when unknown
    or when `$MI_PRUN_SKIP_MEMORY_CHECK` is 1."""
    if need is None or os.environ.get(SKIP_MEMORY_CHECK_ENV, "") in ("1", "true", "yes"):
        return True
    free = available_memory(device)
    return free is None or need * MEMORY_HEADROOM <= free


def check_memory(spec: str, need: int | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before loading, weights larger than the free memory of `device` (with headroom).

    Skipped when the size or the free memory is unknown, or `$MI_PRUN_SKIP_MEMORY_CHECK` is 1.
    """
    if fits(need, device):
        return
    assert need is not None
    free = available_memory(device) or 0
    gib = 2**30
    dt = str(dtype).replace("torch.", "")
    raise MiPrunError(
        f"{spec} needs about {need / gib:.2f} GiB for its weights in {dt}, but only {free / gib:.2f} GiB "
        f"of {device.type} memory is free. Fix: use --stream (streams one block at a time from disk), "
        "--device-map auto (spreads the model over GPUs and CPU), a smaller --dtype (bfloat16 halves float32), or a smaller model; set "
        f"{SKIP_MEMORY_CHECK_ENV}=1 (--skip-memory-check) to try anyway.")


def check_streamable(spec: str, need: int | None, n_blocks: int, device: torch.device,
                     dtype: torch.dtype) -> None:
    """Refuse a model that fits nowhere: streamed, the device still holds one block plus the
    embeddings and head (estimated as three blocks' worth)."""
    if need is None or n_blocks <= 0:
        return
    one = need / n_blocks
    if fits(int(3 * one), device):
        return
    free = available_memory(device) or 0
    gib = 2**30
    raise MiPrunError(
        f"{spec} fits nowhere: even streamed one block at a time it needs about {3 * one / gib:.2f} GiB of "
        f"{device.type} memory (a block, the embeddings and the head), and {free / gib:.2f} GiB are free. Fix: "
        "free memory on the device, a smaller --dtype, or a device with more memory.")


def peak_memory() -> dict[str, int | None]:
    """Peak memory of this process so far: resident set size (the kernel's high-water mark,
    `getrusage`), the current RSS, and on CUDA the most device memory torch ever allocated."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    out: dict[str, int | None] = {"rss_peak_bytes": int(peak), "rss_bytes": None, "cuda_max_allocated_bytes": None}
    try:
        import psutil

        out["rss_bytes"] = int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out
