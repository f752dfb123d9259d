"""Two processes saving the same analysis folder with overwrite=True, N times each (issue 23):
counts saves that succeed, `MiPrunError`s (by message) and raw exceptions.

    python benchmarks/writers_race.py SAVED_ANALYSIS OUT_FOLDER 300
"""
import collections
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def work(args):
    from mi_prun.errors import MiPrunError  # in the worker: spawned processes import afresh
    from mi_prun.results import Analysis

    folder, n, src = args
    a = Analysis.load(src)
    out = collections.Counter()
    for _ in range(n):
        try:
            a.save(folder, overwrite=True)
            out["ok"] += 1
        except MiPrunError as e:
            out["MiPrunError: " + str(e)[:60]] += 1
        except Exception as e:
            out[f"RAW {type(e).__name__}"] += 1
    return out


if __name__ == "__main__":
    src, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with mp.get_context("spawn").Pool(2) as pool:
        res = pool.map(work, [(folder, n, src)] * 2)
    print(sum(res, collections.Counter()))
