"""One-shot GPU check of the Trainer integration: a Llama-3.2-1B-shaped model (random init, no
download) fine-tuned on one CUDA device with the stock `transformers.Trainer` + `LMCleanCallback`,
as LoRA (rank 8, every projection) and as a full fine-tune, then unlearned with `ggn` and `krylov`
(--method lmcleaner --hvp ggn|krylov) and `replay` through `lmclean.unlearn.service.unlearn`.

Prints, per run: recording overhead (step time with vs without the callback, median over steps),
bytes on disk per recorded parameter per step, unlearning time per swept step in training steps,
and peak GPU memory (torch.cuda.max_memory_allocated) of unlearning vs training.

    python benchmarks/gpu_check.py                        # needs CUDA; under 8 minutes on one H200
    python benchmarks/gpu_check.py --device cpu --tiny    # the same code path, tiny model, on CPU (a test)

Without a CUDA device (and without `--device cpu --tiny`) it prints "no CUDA device: skipped" and
exits 0. The full fine-tune records ~4 GB of gradients per step at fp32 (973M parameters with the
byte vocabulary) plus θ and AdamW's moments at steps 0 and T (~24 GB), so it runs 4 steps
(--full-steps) against the LoRA run's 30.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_bench import TARGETS, collate, run_unlearn, step_timer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def rows(n: int, length: int, vocab: int) -> list[dict[str, Any]]:
    """`n` rows of seeded random tokens (no data files on a bare device machine); loss on the second half."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = length // 2 + int(torch.randint(0, length // 2 + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (k,), generator=g).tolist()
        out.append({"id": i, "input_ids": ids, "labels": [-100] * (k // 2) + ids[k // 2:]})
    return out


def make_model(args: argparse.Namespace, lora: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = TINY if args.tiny else LLAMA_1B
    config = LlamaConfig(vocab_size=args.vocab, max_position_embeddings=512, attn_implementation="eager",
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, **shape)
    model = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    return model


def train(args: argparse.Namespace, lora: bool, steps: int, data: list[dict[str, Any]], store: Path | None,
          out: Path) -> dict[str, Any]:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from lmclean.integrations.transformers import LMCleanCallback

    cuda = args.device == "cuda"
    training = TrainingArguments(
        output_dir=str(out), optim="adamw_torch", learning_rate=1e-3 if lora else 3e-5, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, max_grad_norm=1.0, weight_decay=0.01, max_steps=steps, seed=0, report_to=[],
        use_cpu=not cuda, bf16=args.bf16, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    timer = step_timer()
    callbacks: list[Any] = [timer]
    if store is not None:
        callbacks.append(LMCleanCallback(store, id_column="id", checkpoint_every=10_000, overwrite=True))
    trainer = Trainer(model=make_model(args, lora), args=training, train_dataset=data, data_collator=collate,
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    times = timer.times[1:] if len(timer.times) > 2 else timer.times
    return {"wall_s": wall, "step_s": statistics.median(times), "step_mean_s": statistics.fmean(times), "peak_bytes": peak}


def unlearn(args: argparse.Namespace, store: Path, method: str, forget: list[int], work: Path) -> dict[str, Any]:
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, _, info = run_unlearn(store, forget, method, work, args.via, args.device, keep_output=False)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
    return {"wall_s": seconds, "swept_steps": max(1, info["window"][1] - info["window"][0]), "peak_bytes": peak,
            "products": info["products"]}


def check(args: argparse.Namespace, lora: bool, work: Path) -> dict[str, Any]:
    from lmclean.store.reader import TrajectoryStore
    from lmclean.store.writer import store_size_bytes

    name = "lora" if lora else "full"
    steps = args.steps if lora else args.full_steps
    data = rows(16 * steps, args.length, args.vocab)
    store = work / f"{name}.zarr"
    plain = train(args, lora, steps, data, None, work / "trainer")
    rec = train(args, lora, steps, data, store, work / "trainer")
    st = TrajectoryStore(store)
    n, T = st.manifest.size, st.committed_steps
    forget = [int(i) for i in st.step(T // 2).sample_ids[:2]]  # seen mid-run: half the run is swept
    res: dict[str, Any] = {
        "params": n, "steps": T, "step_s_plain": plain["step_s"], "step_s_recorded": rec["step_s"],
        "overhead_pct": 100 * (rec["step_s"] / plain["step_s"] - 1),
        "bytes_per_param_step": store_size_bytes(store) / (n * T),
        "grad_bytes_per_param_step": store_size_bytes(store, "steps/grad") / (n * T),
        "train_peak_gib": max(plain["peak_bytes"], rec["peak_bytes"]) / 2**30, "forget_ids": forget, "unlearn": {}}
    for method in args.methods:
        u = unlearn(args, store, method, forget, work)
        res["unlearn"][method] = {**u, "per_step_in_train_steps": u["wall_s"] / u["swept_steps"] / plain["step_mean_s"],
                                  "peak_gib": u["peak_bytes"] / 2**30}
    shutil.rmtree(store, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny model and few steps (with --device cpu: the CPU test)")
    ap.add_argument("--steps", type=int, default=None, help="LoRA run's optimizer steps (default 30; --tiny 4)")
    ap.add_argument("--full-steps", type=int, default=None, help="full fine-tune's steps (default 4; --tiny 3)")
    ap.add_argument("--length", type=int, default=None, help="tokens per row, at most (default 256; --tiny 24)")
    ap.add_argument("--vocab", type=int, default=384,
                    help="384: ByT5's bytes (default; with Llama 3's 128256 the full run's store outgrows a 64 GB disk)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="TrainingArguments(bf16=True): bf16 autocast, fp32 master weights (default on; the CPU "
                         "test runs it too)")
    ap.add_argument("--methods", default="ggn,krylov,replay",
                    help="ggn / krylov: --method lmcleaner --hvp ggn|krylov (krylov's products under bf16 autocast "
                         "take forward-mode AD, not difference quotients)")
    ap.add_argument("--via", choices=["service", "engine"], default="service",
                    help="service: lmclean.unlearn.service.unlearn on a copy of the store; engine: its sweep only")
    ap.add_argument("--workdir", type=Path, help="where the stores go (default: a temporary directory)")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "none"
    if args.device == "cuda" and not torch.cuda.is_available() or args.device == "none" \
            or (args.device == "cpu" and not args.tiny):
        print("no CUDA device: skipped")
        return 0
    args.steps = args.steps or (4 if args.tiny else 30)
    args.full_steps = args.full_steps or (3 if args.tiny else 4)
    args.length = args.length or (24 if args.tiny else 256)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.device == "cpu":
        torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls transformers' deprecated names
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmclean-gpu-check-", dir=args.workdir) as tmp:
        results = {name: check(args, name == "lora", Path(tmp)) for name in ("lora", "full")}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device}, bf16={args.bf16}, {time.perf_counter() - started:.0f} s in all")
    print("| run | recorded params | steps | step s | overhead | B/param/step (store / grads) | train peak GiB | "
          "method | unlearn s | per swept step, in training steps | unlearn peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for method, u in r["unlearn"].items():
            print(f"| {name} | {r['params']:,} | {r['steps']} | {r['step_s_plain']:.3f} | {r['overhead_pct']:+.1f}% | "
                  f"{r['bytes_per_param_step']:.2f} / {r['grad_bytes_per_param_step']:.2f} | {r['train_peak_gib']:.2f} | "
                  f"{method} | {u['wall_s']:.1f} | {u['per_step_in_train_steps']:.2f} | {u['peak_gib']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device, "bf16": args.bf16, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
