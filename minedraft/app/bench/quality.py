"""`minedraft bench-quality`: what a numeric format costs in model quality, measured, not assumed.

The reference is the model in float32 (the GGUF dequantised exactly). It writes a greedy continuation for
each held-out prompt (HumanEval problems the throughput benchmark does not use); each format under test
then reads prompt + continuation in one forward (the continuation's rows counted as generated, for formats that
compute prompts apart: `prompt_rows`), and top-1 agreement is the share of continuation positions where its
argmax is the reference's token. For a draft this is a proxy for acceptance; for a target, how
often it would have written something else.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.prompt_rows import feeding
from minedraft.models.store import fetch_human_eval, resolve_model

HELD_OUT_FROM = 100  # the benchmark reads HumanEval from problem 0 on


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="default-draft,default-target")
    parser.add_argument("--formats", default="bfloat16/none,bfloat16/int8,bfloat16/int4,bfloat16/w8a8",
                        help="comma list of DTYPE/QUANT")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="continuation tokens per prompt")
    parser.add_argument("--out", default="runs/quality")


def held_out_prompts(count: int) -> list[str]:
    with gzip.open(fetch_human_eval(), "rt") as f:
        problems = [json.loads(line)["prompt"] for line in f]
    return problems[HELD_OUT_FROM:HELD_OUT_FROM + count]


@torch.inference_mode()
def reference_continuations(path: str, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    model = ModelRunner.load(path, dtype="float32", cpu_linear="torch", kv="dynamic").model
    return [model.generate(torch.tensor([p]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@torch.inference_mode()
def agreement(model, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    agree = total = 0
    for prompt, cont in zip(prompts, continuations, strict=True):
        with feeding([SequenceState(prompt + cont, prompt_len=len(prompt))]):
            logits = model(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1:-1]
        agree += int((logits.argmax(-1) == torch.tensor(cont)).sum())
        total += len(cont)
    return agree / total


def run(args: argparse.Namespace) -> int:
    rows = []
    texts = held_out_prompts(args.prompts)
    for spec in args.models.split(","):
        path = str(resolve_model(spec))
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        started = time.perf_counter()
        continuations = reference_continuations(path, prompts, args.tokens)
        print(f"{spec}: float32 reference, {len(prompts)} prompts x {args.tokens} tokens "
              f"in {time.perf_counter() - started:.0f}s", flush=True)
        for fmt in args.formats.split(","):
            dtype, quant = fmt.split("/")
            model = ModelRunner.load(path, dtype=dtype, quant=quant, kv="dynamic").model
            rows.append({"model": spec, "dtype": dtype, "quant": quant,
                         "top1_agreement": agreement(model, prompts, continuations)})
            print(f"{spec} {dtype}/{quant}: top-1 agreement {rows[-1]['top1_agreement']:.4f}", flush=True)
            del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = ["| model | dtype | weights | top-1 agreement with float32 |", "|---|---|---|---|"]
    table += [f"| {r['model']} | {r['dtype']} | {r['quant']} | {r['top1_agreement']:.4f} |" for r in rows]
    (out / "quality.json").write_text(json.dumps({"prompts": len(texts), "tokens": args.tokens, "rows": rows},
                                                 indent=2))
    (out / "quality.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0
