"""A stock `transformers.Trainer` fine-tune recorded with `LMCleanCallback`, then unlearned (issue 12 §4).

A 10.9M-parameter byte-level Llama (hidden 384, 6 layers, 6 heads, intermediate 1024, ByT5's
384-token byte vocabulary, eager attention, random init) is trained on TOFU question/answer rows
(loss on the answer only) through the real Trainer (AdamW, batch 8 × accumulation 2, clipping at
1.0, weight decay 0.01, linear decay), as (a) a full fine-tune and (b) LoRA rank 8 on every
projection. For each, measured side by side in this one process, one run at a time:

  overhead   step time with the callback vs without (median over steps; and whole `train()` wall
             time, which adds the store's creation, checkpoints and close); process CPU time too,
             which load from other processes on the machine disturbs less
  bytes      store size on disk / (recorded parameters × steps); also the gradients alone
  unlearning forget one TOFU author (20 rows) as `lmclean unlearn` does (ggn = --method lmcleaner
             --hvp ggn, replay, rollback; --via service: `lmclean.unlearn.service.unlearn`, each
             request on a copy of the store; --via engine: its sweep `service.run_method` alone),
             against exact retraining by the Trainer itself (`LMCleanCallback(...,
             exclude=forget_ids)`, same seed and batch order): residual ‖θ̂ − θ_retrain‖ /
             ‖θ − θ_retrain‖, forget-loss gap closed (L_F(θ̂) − L_F(θ)) / (L_F(θ_retrain) − L_F(θ))
             (L_F: mean answer-token CE of the forget rows), and cost = wall time / mean step time
             of the unrecorded run, in training steps.

Run order per mode: recorded, unrecorded, retraining (recorded): the unrecorded run sits between
two recorded ones, and the overhead compares it with the recorded run of the same data.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/trainer_bench.py --out runs/trainer_bench.json
    .venv/bin/python benchmarks/trainer_bench.py --quick --out /tmp/q.json   # tiny model, under a minute
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOFU = ROOT.parent / "shared" / "data" / "tofu"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS_PER_AUTHOR = 20  # TOFU: 200 authors x 20 QA pairs, in order
IGNORE = -100


# -- data ----------------------------------------------------------------------------------------
def tofu_rows(tofu: Path, authors: int) -> list[dict[str, Any]]:
    """The first `authors` TOFU authors' rows of full.jsonl ({"id", "question", "answer"})."""
    path = Path(tofu) / "full.jsonl"
    if not path.is_file():
        raise SystemExit(f"TOFU file {path} does not exist; pass --tofu DIR (the directory holding full.jsonl)")
    rows = []
    with path.open() as f:
        for line in f:
            if len(rows) == authors * ROWS_PER_AUTHOR:
                break
            rows.append(json.loads(line))
    return rows


def encode(rows: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[dict[str, Any]]:
    """`question\\n` + `answer</s>` as bytes, cut at `max_len`; labels -100 on the question (cut to
    max_len/2 bytes so every row keeps answer tokens)."""
    out = []
    for r in rows:
        prompt = tokenizer.encode(r["question"] + "\n", add_special_tokens=False)[: max_len // 2]
        answer = tokenizer.encode(r["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_len]
        out.append({"id": int(r["id"]), "input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt):]})
    return out


def collate(rows: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right padding; labels -100 on padding; the sample ids as a tensor (the callback reads `id`)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[k, :n] = torch.tensor(r["input_ids"])
        mask[k, :n] = 1
        labels[k, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "id": torch.tensor([r["id"] for r in rows])}


# -- model and one Trainer run -------------------------------------------------------------------
def llama_config(vocab: int, tiny: bool = False, **shape: int) -> Any:
    from transformers import LlamaConfig

    dims = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
            if tiny else dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6))
    dims.update(shape)
    dims.setdefault("num_key_value_heads", dims["num_attention_heads"])
    # ByT5's pad 0 / eos 1 set here: the Trainer would otherwise write them into the config at
    # train(), and a model built from that config later gets a zeroed padding row in its embedding
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=256, attn_implementation="eager",
                       pad_token_id=0, eos_token_id=1, bos_token_id=None, **dims)


def make_model(config: Any, lora: bool, seed: int = 0) -> torch.nn.Module:
    """Random init from `seed`; with `lora`, rank-8 adapters on every projection (same seed: the
    recorded run and its retraining start from the same weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(copy.deepcopy(config))  # a config of its own: the Trainer may edit it
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed + 1)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    return model


@dataclass
class RunResult:
    wall: float  # trainer.train() seconds
    cpu: float  # process CPU seconds (all threads) during train()
    steps: list[float]  # per optimizer step: on_step_begin -> on_step_end
    trainer: Any = None
    callback: Any = None


def step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter() - self._t)

    return StepTimes()


def train_once(model: torch.nn.Module, data: list[dict[str, Any]], tokenizer: Any, outdir: Path, steps: int, lr: float,
               store: Path | None = None, exclude: list[int] | None = None, seed: int = 0,
               bf16: bool = False, use_cpu: bool = True) -> RunResult:
    """One `Trainer.train()`: recorded into `store` with LMCleanCallback, or (store None) not."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from lmclean.integrations.transformers import LMCleanCallback

    args = TrainingArguments(
        output_dir=str(outdir), optim="adamw_torch", learning_rate=lr, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, max_grad_norm=1.0, weight_decay=0.01, max_steps=steps, seed=seed,
        report_to=[], use_cpu=use_cpu, bf16=bf16, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    timer = step_timer()
    cb = (LMCleanCallback(store, id_column="id", exclude=exclude, overwrite=True, codec=os.environ.get("LMCLEAN_BENCH_CODEC", "auto"))
          if store is not None else None)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, processing_class=tokenizer,
                      callbacks=[timer] + ([cb] if cb else []))
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict on stdout
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trainer.train()
    return RunResult(time.perf_counter() - wall0, time.process_time() - cpu0, timer.times, trainer, cb)


# -- unlearning and its measures -----------------------------------------------------------------
def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a closed store for one more unlearning request: the large files that no request
    modifies (gradients, checkpoints, the recorded model and base) are hard links, the rest copied
    (the audit log is appended to)."""
    big = ("steps/grad", "checkpoints", "model", "base")

    def copy(s: str, d: str) -> None:
        rel = Path(s).relative_to(src).as_posix()
        (os.link if rel.startswith(big) else shutil.copy2)(s, d)

    shutil.copytree(src, dst, copy_function=copy, ignore=shutil.ignore_patterns(".lmclean.lock"))
    return dst


def options_for(method: str, device: str = "cpu") -> Any:
    """What `lmclean unlearn --method M` runs with its defaults (ggn, krylov: --method lmcleaner --hvp M)."""
    from lmclean.unlearn.lmcleaner import PropagationSettings
    from lmclean.unlearn.operators import OperatorSettings
    from lmclean.unlearn.service import UnlearnOptions

    curvature = method if method in ("ggn", "krylov") else "ggn"
    return UnlearnOptions(method="lmcleaner" if method in ("ggn", "krylov") else method, device=device,
                          propagation=PropagationSettings(operator=OperatorSettings(hvp=curvature)))


def run_unlearn(store: Path, forget: list[int], method: str, work: Path, via: str, device: str = "cpu",
                keep_output: bool = True) -> tuple[float, torch.Tensor | None, dict[str, Any]]:
    """(seconds, θ̂ (None without `keep_output`), {steps_touched, products, window}) of one request.

    via "service": `lmclean.unlearn.service.unlearn` (what `lmclean unlearn ... --keep-data` runs:
    checks, sweep, model written, audit record), on a copy of the store (a store refuses a second
    request for the same samples). via "engine": only the sweep `lmclean unlearn` runs
    (`service.run_method`) on the store, θ̂ = θ[τ] + δ, nothing written."""
    from lmclean.store.reader import TrajectoryStore
    from lmclean.unlearn import ForgetSet
    from lmclean.unlearn.request import ForgetSpec, Requester
    from lmclean.unlearn.service import OutputSpec, open_trajectory, run_method, unlearn

    options = options_for(method, device)
    st = TrajectoryStore(store)
    if via == "engine":
        start = time.perf_counter()
        traj = open_trajectory(st, device)
        result = run_method(traj, ForgetSet(set(forget)), options, None)
        seconds = time.perf_counter() - start
        theta_hat = st.checkpoint(st.committed_steps)[0] + result.delta.float().cpu() if keep_output else None
        return seconds, theta_hat, {"steps_touched": result.steps_touched, "products": result.products,
                                    "window": list(result.window)}
    out = work / f"{store.stem}-{method}-out"
    shutil.rmtree(out, ignore_errors=True)  # a kept --workdir's earlier run
    copy = linked_copy(store, work / f"{store.stem}-{method}.zarr")
    try:
        start = time.perf_counter()
        report = unlearn(copy, ForgetSpec(ids=",".join(map(str, forget))), options, OutputSpec(out=out),
                         Requester(keep_data=True))
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(copy)
    theta_hat = theta_of(st, out) if keep_output else None
    if not keep_output:
        shutil.rmtree(out)
    return seconds, theta_hat, {"steps_touched": report["steps_touched"],
                                "products": report["curvature_products"], "window": report["window"]}


def theta_of(store: Any, model_dir: Path) -> torch.Tensor:
    from lmclean.adapters import load_for_store
    from lmclean.params import flat_params

    return flat_params(load_for_store(store, model_dir), store.manifest).float()


def forget_loss(traj: Any, theta: torch.Tensor, forget: list[int]) -> float:
    """Mean over the forget samples of their answer-token mean CE at θ (tokens from the step each
    sample first appears in; the stored weights undone)."""
    seen: dict[int, int] = {}
    wanted = set(forget)
    for t in range(traj.n_steps):
        for i in traj.batch(t).sample_ids:
            if int(i) in wanted:
                seen.setdefault(int(i), t)
    total = 0.0
    with torch.no_grad():
        views = traj.manifest.views(theta)
        for i, t in seen.items():
            batch = traj.batch(t)
            w = float(batch.weights[[int(j) for j in batch.sample_ids].index(i)])
            obj = traj.objective(t, [i])
            total += float(obj.loss_from_outputs(obj.outputs(views))) / w
    return total / max(1, len(seen))


@dataclass
class ModeResult:
    mode: str
    params: int
    steps: int
    figures: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)


def _median(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 2 else xs)  # the first step also warms allocator and caches


def bench_mode(mode: str, args: argparse.Namespace, data: list[dict[str, Any]], tokenizer: Any, forget: list[int],
               work: Path) -> ModeResult:
    from lmclean.store.reader import TrajectoryStore
    from lmclean.store.writer import store_size_bytes
    from lmclean.unlearn.service import open_trajectory

    lora = mode == "lora"
    config = llama_config(len(tokenizer), tiny=args.quick)
    lr = args.lr_lora if lora else args.lr_full
    full, retrain = work / f"{mode}.zarr", work / f"{mode}-retrain.zarr"
    run = lambda store=None, exclude=None: train_once(  # noqa: E731
        make_model(config, lora, args.seed), data, tokenizer, work / f"{mode}-trainer", args.steps, lr,
        store=store, exclude=exclude, seed=args.seed)
    rec, plain, ref = run(full), run(), run(retrain, forget)
    for name, r in (("recorded", rec), ("plain", plain), ("retraining", ref)):
        print(f"  {mode} {name}: {len(r.steps)} steps, {_median(r.steps):.2f} s/step (median), {r.wall:.0f} s",
              file=sys.stderr, flush=True)
    store, ref_store = TrajectoryStore(full), TrajectoryStore(retrain)
    n, T = store.manifest.size, store.committed_steps
    unit = statistics.fmean(plain.steps[1:] if len(plain.steps) > 1 else plain.steps)
    res = ModeResult(mode, n, T)
    res.figures = {
        "lr": lr, "step_s_plain": _median(plain.steps), "step_s_recorded": _median(rec.steps),
        "step_s_mean_plain": unit,
        "overhead_step_pct": 100 * (_median(rec.steps) / _median(plain.steps) - 1),
        "overhead_wall_pct": 100 * (rec.wall / plain.wall - 1),
        "overhead_cpu_pct": 100 * (rec.cpu / plain.cpu - 1),
        "wall_s_plain": plain.wall, "wall_s_recorded": rec.wall, "wall_s_retrain": ref.wall,
        "bytes_per_param_step": store_size_bytes(full) / (n * T),
        "grad_bytes_per_param_step": store_size_bytes(full, "steps/grad") / (n * T),
        "store_bytes": store_size_bytes(full),
    }
    theta = store.checkpoint(T)[0]
    theta_ref = ref_store.checkpoint(ref_store.committed_steps)[0]
    base = float(torch.linalg.vector_norm(theta - theta_ref))
    traj = open_trajectory(store)
    lf = {"orig": forget_loss(traj, theta, forget), "retrain": forget_loss(traj, theta_ref, forget)}
    res.figures.update(theta_dist=base, forget_loss_orig=lf["orig"], forget_loss_retrain=lf["retrain"])
    for method in args.methods:
        seconds, theta_hat, info = run_unlearn(full, forget, method, work, args.via)
        lf_hat = forget_loss(traj, theta_hat, forget)
        res.methods[method] = {
            "residual": float(torch.linalg.vector_norm(theta_hat - theta_ref)) / base,
            "gap": (lf_hat - lf["orig"]) / (lf["retrain"] - lf["orig"]) if lf["retrain"] != lf["orig"] else None,
            "forget_loss": lf_hat, "seconds": seconds, "cost_train_steps": seconds / unit, **info}
        print(f"  {mode} {method}: residual {res.methods[method]['residual']:.3f}, {seconds:.1f} s", file=sys.stderr,
              flush=True)
    for p in (full, retrain):  # gigabytes each at full size
        shutil.rmtree(p, ignore_errors=True)
    return res


def table(results: list[ModeResult]) -> str:
    lines = ["| mode | recorded params | steps | step s (plain) | overhead/step (median) | overhead, whole train() | "
             "CPU overhead | B/param/step (store) | B/param/step (grads) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r.figures
        lines.append(f"| {r.mode} | {r.params:,} | {r.steps} | {f['step_s_plain']:.3f} | {f['overhead_step_pct']:+.1f}% | "
                     f"{f['overhead_wall_pct']:+.1f}% | {f['overhead_cpu_pct']:+.1f}% | {f['bytes_per_param_step']:.2f} | "
                     f"{f['grad_bytes_per_param_step']:.2f} |")
    lines += ["", "| mode | method | residual | forget-loss gap closed | seconds | cost (training steps) | "
              "steps with forget samples / swept |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        for name, m in r.methods.items():
            gap = "n/a" if m["gap"] is None else f"{m['gap']:.2f}"
            lines.append(f"| {r.mode} | {name} | {m['residual']:.3f} | {gap} | {m['seconds']:.1f} | "
                         f"{m['cost_train_steps']:.1f} | {len(m['steps_touched'])} / {m['window'][1] - m['window'][0]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tofu", type=Path, default=DEFAULT_TOFU, help="TOFU directory (holds full.jsonl)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 24; --quick 4)")
    ap.add_argument("--authors", type=int, default=None, help="TOFU authors trained on (20 rows each; default 10)")
    ap.add_argument("--forget-author", type=int, default=None,
                    help="index of the author whose 20 rows are forgotten (default 3; --quick 1)")
    ap.add_argument("--max-len", type=int, default=None, help="bytes per row (default 96; --quick 48)")
    ap.add_argument("--lr-full", type=float, default=3e-4)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--methods", default="ggn,replay,rollback")
    ap.add_argument("--via", choices=["service", "engine"], default="service",
                    help="service: each request through lmclean.unlearn.service.unlearn on a copy of the store "
                         "(default); engine: only its sweep (service.run_method), nothing written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (a test checks the script runs)")
    ap.add_argument("--workdir", type=Path, help="keep the stores here (default: a temporary directory, removed)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 24)
    args.authors = args.authors or (2 if args.quick else 10)
    args.max_len = args.max_len or (48 if args.quick else 96)
    args.forget_author = (1 if args.quick else 3) if args.forget_author is None else args.forget_author
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not 0 <= args.forget_author < args.authors:
        ap.error(f"--forget-author {args.forget_author} must be below --authors {args.authors}")
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import ByT5Tokenizer

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls transformers' deprecated names
    tokenizer = ByT5Tokenizer()
    data = encode(tofu_rows(args.tofu, args.authors), tokenizer, args.max_len)
    first = args.forget_author * ROWS_PER_AUTHOR
    forget = [r["id"] for r in data[first: first + ROWS_PER_AUTHOR]]
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="lmclean-trainer-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            print(f"{mode}: training (recorded, plain, retraining without ids {forget[0]}-{forget[-1]})", file=sys.stderr,
                  flush=True)
            results.append(bench_mode(mode, args, data, tokenizer, forget, work))
    total = time.perf_counter() - started
    config = {"model": "tiny" if args.quick else "llama hidden 384, 6 layers, 6 heads, intermediate 1024, vocab 384",
              "steps": args.steps, "batch": "8 x accumulation 2", "max_len": args.max_len, "authors": args.authors,
              "rows": len(data), "forget_ids": forget, "threads": torch.get_num_threads(), "seconds": total,
              "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"{len(data)} TOFU rows ({args.authors} authors, {args.max_len} bytes), {args.steps} steps, forget ids "
          f"{forget[0]}-{forget[-1]}, torch threads {torch.get_num_threads()}, {total:.0f} s in all\n")
    print(table(results))
    if args.out:
        payload = {"config": config, "modes": {r.mode: {"params": r.params, "steps": r.steps, **r.figures,
                                                         "methods": r.methods} for r in results}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
