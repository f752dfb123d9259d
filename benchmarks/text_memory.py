"""Peak memory of reading and tokenising a long calibration text (issue 23): the built-in text
repeated to SIZE MB in a file, then `calibration_tokens(tiny-llama's tokenizer, load_text(file), 8,
48)`. Run it under `/usr/bin/time -v` and read "Maximum resident set size":

    /usr/bin/time -v python benchmarks/text_memory.py /tmp/big100.txt 100

tiny-llama's tokenizer makes about one token per character, the worst case for the ids' memory.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mi_prun.data import builtin_text, calibration_tokens, load_text  # noqa: E402
from mi_prun.runtime import load_model  # noqa: E402

path, size_mb = Path(sys.argv[1]), int(sys.argv[2])
if not path.is_file():
    text, n = builtin_text(), 0
    with open(path, "w") as fh:
        while n < size_mb * 10**6:
            fh.write(text)
            fh.write("\n\n")
            n += len(text) + 2
loaded = load_model("tiny-llama")
t0 = time.time()
calib = calibration_tokens(loaded.tokenizer, load_text(str(path)), 8, 48)
print(f"{calib.provenance['text_tokens']} text tokens, {time.time() - t0:.1f} s")
