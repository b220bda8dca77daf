"""Data-file cases shared by the cache tests (unit: driver executor; ray: Ray Data executor): good records,
one file per bad-record class, and the two paths to compare (read straight through vs the cache)."""
import gzip
import json
import logging
import re

from unipipe_ray.data.stage_data import load_stage_data
from unipipe_ray.runtime.data_prep import prepare_stage_data


def sft_line(i, tag="a"):
    return json.dumps({"prompt": f"{tag} question {i}?", "response": f"answer {i}"})


def pair_line(i):
    return json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"})


def write_lines(path, lines, gz=False):
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def direct(data, kind, tokenizer):
    train, held_out, _ = load_stage_data(data, kind, tokenizer)
    return train, held_out


def cached(data, kind, tokenizer, root, executor="driver"):
    train, held_out, _ = prepare_stage_data(data, kind, tokenizer, str(root), executor=executor)
    return list(train), list(held_out)


def outcome(fn, caplog):
    """('ok', train, held-out, skip summaries) or ('error', type, message): what a user sees."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        try:
            train, held_out = fn()
        except (ValueError, FileNotFoundError) as e:
            return "error", type(e).__name__, str(e)
    skips = sorted({m.group(0) for r in caplog.records for m in [re.search(r"skipped \d+ of \d+ .*", r.getMessage())]
                    if m})  # the direct path says it twice
    return "ok", train, held_out, skips


GOOD = [sft_line(i) for i in range(14)]
PAIRS = [pair_line(i) for i in range(14)]


def insert(lines, at, bad):
    out = list(lines)
    for i, line in sorted(zip(at, bad, strict=True)):
        out.insert(i, line)
    return out


# Every bad-record class the readers and parsers know, each placed after the first range so that its line
# number is counted across ranges; twice where the first is what error mode must name.
CASES = {
    "malformed_json": ("sft", "x.jsonl", insert(GOOD, [6, 11], ['{"prompt": "q", ', '{"prompt": '])),
    "invalid_utf8": ("sft", "x.jsonl", insert(GOOD, [9], ['{"prompt": "\udcff"}'])),
    "not_an_object": ("sft", "x.jsonl", insert(GOOD, [7], ['["a", "b"]'])),
    "missing_field": ("sft", "x.jsonl", insert(GOOD, [8, 12], ['{"prompt": "q"}', '{"response": "r"}'])),
    "empty_and_wrong_type": ("sft", "x.jsonl", insert(GOOD, [5, 10], ['{"prompt": "", "response": "r"}',
                                                                       '{"prompt": 3, "response": "r"}'])),
    "unknown_role": ("sft", "x.jsonl", insert(GOOD, [9], [json.dumps(
        {"prompt": [{"role": "robot", "content": "hi"}], "response": "r"})])),
    "deep_nesting": ("sft", "x.jsonl", insert(GOOD, [8], ['{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"])),
    "identical_pair": ("preference", "x.jsonl", insert(PAIRS, [7], [json.dumps(
        {"prompt": "q", "chosen": "same", "rejected": "same"})])),
    "identical_after_truncation": ("preference", "x.jsonl", insert(PAIRS, [9], [json.dumps(
        {"prompt": "q", "chosen": "w " * 80 + "yes", "rejected": "w " * 80 + "no"})])),
    "gz_malformed": ("sft", "x.jsonl.gz", insert(GOOD, [4], ['{"prompt": '])),
    "json_file_malformed": ("sft", "x.json", None),
    "corrupt_gzip": ("sft", "x.jsonl.gz", None),
}


def write_case(tmp_path, name):
    kind, filename, lines = CASES[name]
    path = tmp_path / filename
    if name == "json_file_malformed":
        path.write_text("[\n" + ",\n".join(GOOD[:5]) + ',\n{"prompt": }\n]')
    elif name == "corrupt_gzip":
        whole = gzip.compress("\n".join(GOOD).encode())
        path.write_bytes(whole[:len(whole) // 2])
    elif name == "invalid_utf8":
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    else:
        write_lines(path, lines, gz=filename.endswith(".gz"))
    return kind, path
