"""A stock `transformers.Trainer` fine-tune recorded into an lmclean store with `LMCleanCallback`.

A tiny byte-level Llama (random init, no download) learns the question/answer facts of
examples/data/facts.jsonl (or a TOFU slice: --data TOFU_DIR/full.jsonl --rows 200). The only
lmclean-specific lines are the callback, `remove_unused_columns=False` and the collator passing the
`id` column. Then, on the store it wrote:

    lmclean inspect-log runs/trainer/facts.zarr
    lmclean unlearn runs/trainer/facts.zarr --forget 0,1 --method lmcleaner --hvp ggn
    lmclean audit show runs/trainer/facts.zarr

    python examples/trainer/train.py                 # full fine-tune  -> runs/trainer/facts.zarr
    python examples/trainer/train.py --lora          # LoRA adapters   -> runs/trainer/facts-lora.zarr
    python examples/trainer/train.py --exclude 0,1   # the same run without samples 0 and 1 (exact retraining)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lmclean.integrations.transformers import LMCleanCallback

HERE = Path(__file__).resolve().parent
IGNORE = -100  # no loss here: the question and the padding


def load_rows(path: Path, tokenizer: ByT5Tokenizer, limit: int | None, max_len: int) -> list[dict[str, Any]]:
    """Rows {"id", "input_ids", "labels"}: `question\\n` + `answer</s>` as bytes, loss on the answer only."""
    rows = []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            prompt = tokenizer.encode(r["question"] + "\n", add_special_tokens=False)[: max_len // 2]
            answer = tokenizer.encode(r["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
            ids = (prompt + answer)[:max_len]
            rows.append({"id": int(r["id"]), "input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt):]})
            if limit and len(rows) == limit:
                break
    return rows


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right padding (pad id 0), labels -100 on padding, and the sample ids as a tensor `id`:
    the callback takes them off the batch before the model sees it."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long)}
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][k, :n] = torch.tensor(r["input_ids"])
        batch["attention_mask"][k, :n] = 1
        batch["labels"][k, :n] = torch.tensor(r["labels"])
    batch["id"] = torch.tensor([r["id"] for r in rows])
    return batch


def make_model(vocab: int, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         attn_implementation="eager", pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HERE.parent / "data" / "facts.jsonl",
                    help="JSON Lines with id, question, answer")
    ap.add_argument("--rows", type=int, default=None, help="use the first N rows only")
    ap.add_argument("--max-len", type=int, default=96, help="bytes per row")
    ap.add_argument("--store", type=Path, default=None, help="default runs/trainer/facts[-lora].zarr")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 8, attention projections) only")
    ap.add_argument("--exclude", default="", help="comma-separated ids to leave out: the exact-retraining reference")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tokenizer = ByT5Tokenizer()  # byte-level: pad 0, eos 1, ids 3..258 are the bytes
    data = load_rows(args.data, tokenizer, args.rows, args.max_len)
    store = args.store or Path("runs/trainer") / ("facts-lora.zarr" if args.lora else "facts.zarr")
    exclude = [int(i) for i in args.exclude.split(",") if i.strip()]
    training = TrainingArguments(
        output_dir=str(store.with_suffix(".trainer")), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=1e-3 if args.lora else 3e-3,
        weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch", seed=0, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
        remove_unused_columns=False)  # keep the `id` column for the callback
    callback = LMCleanCallback(store, id_column="id", exclude=exclude, overwrite=args.overwrite)
    trainer = Trainer(model=make_model(len(tokenizer), args.lora), args=training, train_dataset=data,
                      data_collator=collate, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    print(f"recorded {trainer.state.global_step} steps of {len(data)} rows into {store}"
          + (f" (without ids {exclude})" if exclude else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
