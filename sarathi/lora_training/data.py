"""Fine-tuning data: JSONL lines of {"text"}, {"prompt", "completion"} or {"messages"},
turned into (input_ids, labels) with -100 on tokens that carry no loss: the prompt of a
prompt/completion pair, and everything but the assistant turns of a conversation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

IGNORE = -100


class DataError(ValueError):
    pass


def read_jsonl(path) -> List[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"data file {str(path)!r} has no examples")
    return rows


def _conversation(tokenizer, messages, where: str) -> Tuple[List[int], List[int]]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
        raise DataError(f"{where}: messages must be a list of {{role, content}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: a conversation needs an assistant turn to learn from")
    ids: List[int] = []
    labels: List[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(f"{where}: the chat template does not render turns as a growing prefix")
        context = tokenizer.encode(prefix[len(done):], add_special_tokens=False)
        answer = tokenizer.encode(full[len(prefix):], add_special_tokens=False)
        ids += context + answer
        labels += [IGNORE] * len(context) + answer
        done = full
    return ids, labels


def encode_examples(rows: List[dict], tokenizer, max_length: int, source: str = "data") -> List[Dict[str, List[int]]]:
    """Each row -> one or more {"input_ids", "labels"} of at most max_length tokens (long texts
    are cut into consecutive windows; pairs and conversations are truncated at the end)."""
    return [w for windows in encode_rows(rows, tokenizer, max_length, source) for w in windows]


def encode_rows(rows: List[dict], tokenizer, max_length: int, source: str = "data") -> List[List[Dict[str, List[int]]]]:
    """The windows of each row, row by row; the first invalid row raises DataError naming it."""
    eos = tokenizer.eos_token_id
    per_row = []
    for n, row in enumerate(rows, 1):
        out: List[Dict[str, List[int]]] = []
        per_row.append(out)
        where = f"{source}: example {n}"
        if "messages" in row:
            ids, labels = _conversation(tokenizer, row["messages"], where)
        elif "prompt" in row or "completion" in row:
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                raise DataError(f"{where}: prompt and completion must both be strings")
            p = tokenizer.encode(row["prompt"])
            c = tokenizer.encode(row["completion"], add_special_tokens=False) + ([eos] if eos is not None else [])
            ids, labels = p + c, [IGNORE] * len(p) + c
        elif "text" in row:
            if not isinstance(row["text"], str) or not row["text"]:
                raise DataError(f"{where}: text must be a non-empty string")
            ids = tokenizer.encode(row["text"]) + ([eos] if eos is not None else [])
            for start in range(0, len(ids) - 1, max_length):
                window = ids[start:start + max_length]
                if len(window) > 1:
                    out.append({"input_ids": window, "labels": list(window)})
            continue
        else:
            raise DataError(f"{where}: expected a 'text', 'prompt'/'completion' or 'messages' field; "
                            f"got {sorted(row)[:5]}")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE for t in labels[1:]):
            raise DataError(f"{where}: no completion tokens fit in --max-length {max_length}")
        out.append({"input_ids": ids, "labels": labels})
    return per_row


class Collator:
    """Right-pads a batch; padded positions carry no loss and no attention."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
