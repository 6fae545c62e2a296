"""Recording overhead of `LMCleanCallback` on the 10.9M-parameter Trainer fine-tune, rounds alternated.

The same model, data and Trainer settings as benchmarks/trainer_bench.py (which also measures the
unlearning). Here only the overhead: after one warm-up run (the first `train()` of a process is
2-3× slower: allocator and thread-pool warm-up), plain and recorded runs alternate for `--rounds`
rounds, and the median step time of each kind is compared (the first step of each run is left
out: it builds the store or the dataloader).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/trainer_overhead.py --steps 8 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_bench as tb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tofu", type=Path, default=tb.DEFAULT_TOFU)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import ByT5Tokenizer

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    tokenizer = ByT5Tokenizer()
    data = tb.encode(tb.tofu_rows(args.tofu, 10), tokenizer, 96)
    config = tb.llama_config(len(tokenizer))
    print("| mode | recorded params | step s plain (median) | step s recorded (median) | overhead | per round |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="lmclean-overhead-") as tmp:
        work = Path(tmp)
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            lora = mode == "lora"
            lr = 1e-3 if lora else 3e-4

            def run(record: bool, k: int) -> list[float]:
                store = work / f"{mode}-{k}.zarr" if record else None
                r = tb.train_once(tb.make_model(config, lora), data, tokenizer, work / "trainer", args.steps, lr, store=store)
                return r.steps[1:]

            run(False, -1)  # warm-up
            plain: list[float] = []
            rec: list[float] = []
            rounds = []
            for k in range(args.rounds):
                p = run(False, k) if k % 2 == 0 else None
                r = run(True, k)
                if p is None:
                    p = run(False, k)
                plain += p
                rec += r
                rounds.append(100 * (statistics.median(r) / statistics.median(p) - 1))
            params = sum(x.numel() for x in tb.make_model(config, lora).parameters() if x.requires_grad)
            mp, mr = statistics.median(plain), statistics.median(rec)
            print(f"| {mode} | {params:,} | {mp:.3f} | {mr:.3f} | {100 * (mr / mp - 1):+.1f}% | "
                  f"{', '.join(f'{x:+.1f}%' for x in rounds)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
