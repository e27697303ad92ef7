"""Offline long prompts for the benchmarks: documents, needles and questions.

Nothing is downloaded. Documents are built from the Python standard library's own
docstrings (``inspect.getdoc``) or from generated records, so every run on every
machine builds the same prompts for the same tokenizer and seed.

Five kinds of prompt, cycled in this order:

* ``passkey`` (needle): a docstring document with one sentence stating a 5-digit
  pass key inserted at some depth; the question asks for the key.
* ``summary``: a docstring document followed by a summarisation instruction.
* ``record`` (needle): a list of generated personnel records (name, city, badge
  number); the question asks for the badge number of the person at some depth.
* ``qa``: a docstring document followed by a question about one documented object.
* ``long``: a docstring document followed by an instruction whose answer is long
  (a tutorial), so that quality is also measured far into the output.

Needle depths are spread evenly from 10% to 90% of the document over the needle
prompts, alternating between the two needle kinds, so that needles sit everywhere
and not only near the end, which the protected recent tokens always keep.

Needle prompts end the assistant turn with a short answer primer ("The pass key
is"), so that a 135M instruction model answers with the fact rather than with
chatter; the check is whether the generated continuation contains the needle.
Prompt lengths are spread evenly over ``[min_tokens, max_tokens]`` (chat template
and primer included) and shuffled across kinds.

Also holds ``CpuMeter``, which both benchmarks use to report how much CPU other jobs
took while they ran (the numbers come from a shared 2-core machine).
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import time
from dataclasses import dataclass
from typing import Collection

KINDS = ("passkey", "summary", "record", "qa", "long")
NEEDLE_KINDS = ("passkey", "record")

_MODULES = (
    "argparse", "json", "logging", "pathlib", "subprocess", "threading", "collections", "os", "re", "random",
    "datetime", "functools", "typing", "csv", "http.client", "asyncio", "decimal", "fractions", "statistics",
    "string", "textwrap", "shutil", "tempfile", "zipfile", "tarfile", "enum", "dataclasses", "contextlib",
    "pickle", "calendar", "urllib.parse", "xml.etree.ElementTree", "difflib", "pprint", "base64", "gzip", "io",
    "time", "inspect", "ast", "dis", "tokenize", "traceback", "warnings", "weakref", "uuid", "ipaddress",
    "mimetypes", "configparser", "glob", "fnmatch", "locale", "gettext", "codecs",
)  # fmt: skip

_SUMMARY_INSTRUCTIONS = (
    "Summarize the document above in three sentences.",
    "Write a short overview of the module documented above for a new user.",
    "List the main classes and functions the document above describes, with one line each.",
    "What problem does the module described above solve, and how is it used?",
)

_LONG_INSTRUCTIONS = (
    "Write a detailed tutorial on the module documented above: what it is for, then each main function or class in turn, "
    "with a short example of its use.",
    "Explain the document above to a new programmer, step by step and in detail, covering every object it documents.",
)
NEEDLE_DEPTHS = (0.1, 0.9)  # the shallowest and deepest needle, as shares of the document

_FIRST = (
    "Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Gustav", "Hana", "Ivan", "Jamal", "Kira", "Luis",
    "Mina", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tomoko", "Umar", "Vera", "Wen", "Ximena",
    "Yusuf", "Zara",
)  # fmt: skip
_LAST = (
    "Moreno", "Okafor", "Lindqvist", "Tanaka", "Haddad", "Novak", "Silva", "Kowalski", "Duarte", "Petrov",
    "Abebe", "Fischer", "Nakamura", "Costa", "Ibrahim", "Larsen", "Mendez", "Schmidt", "Yilmaz", "Rossi",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Nairobi", "Oslo", "Kyoto", "Lima", "Tunis", "Krakow", "Hanoi", "Quito", "Dublin", "Cairo",
    "Porto", "Seoul", "Tallinn", "Dakar", "Zagreb", "Bogota", "Perth", "Riga", "Manila",
)  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    index: int
    kind: str
    prompt_token_ids: list[int]
    needle: str | None  # the text a correct answer contains (needle kinds only)
    depth: float | None  # relative position of the needle in the document
    source: str  # module(s) or "records"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)


def _paragraphs(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    paragraphs = []
    if module.__doc__ and len(module.__doc__) > 200:
        paragraphs.append(f"{module_name}:\n{inspect.cleandoc(module.__doc__)}")
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != module_name:
            continue  # re-exported objects: keep each document about its own module
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 200:
            paragraphs.append(f"{name}:\n{doc}")
    return paragraphs


class _Builder:
    def __init__(self, tokenizer, seed: int, exclude: Collection[str] = ()):
        self.tokenizer = tokenizer
        self.modules = [m for m in _MODULES if m not in exclude]
        self.rng = random.Random(seed)
        self._cache: dict[str, list[tuple[str, int]]] = {}

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, user: str, primer: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text + primer, add_special_tokens=False)["input_ids"]

    def doc_paragraphs(self, module_name: str) -> list[tuple[str, int]]:
        if module_name not in self._cache:
            self._cache[module_name] = [(p, self.count(p) + 2) for p in _paragraphs(module_name)]
        return self._cache[module_name]

    def docstring_document(self, target_tokens: int) -> tuple[list[str], list[str]]:
        """Paragraphs from randomly chosen modules, in module order, up to ``target_tokens``."""
        modules = list(self.modules)
        self.rng.shuffle(modules)
        chosen, used, total = [], [], 0
        for module_name in modules:
            for paragraph, tokens in self.doc_paragraphs(module_name):
                if total + tokens > target_tokens:
                    if total >= 0.9 * target_tokens:
                        return chosen, used
                    continue  # a shorter paragraph may still fit
                chosen.append(paragraph)
                total += tokens
                if module_name not in used:
                    used.append(module_name)
            if total >= 0.97 * target_tokens:
                break
        return chosen, used

    def fit(self, make, target: int) -> tuple[list[int], object]:
        """Calls ``make(doc_tokens)`` with a shrinking document budget until the prompt fits ``target``."""
        budget = target
        for _ in range(8):
            ids, extra = make(budget)
            if len(ids) <= target:
                return ids, extra
            budget -= len(ids) - target + 16
        return ids, extra


def _records(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    names = [f"{first} {last}" for first in _FIRST for last in _LAST]
    rng.shuffle(names)
    return [(names[i], rng.choice(_CITIES), str(rng.randint(10000, 99999))) for i in range(count)]


def build_prompts(
    tokenizer, num_prompts: int, min_tokens: int = 1000, max_tokens: int = 3000, seed: int = 0, exclude: Collection[str] = ()
) -> list[Prompt]:
    """``num_prompts`` prompts, kinds cycled as ``KINDS``, lengths spread over the range; no document from an ``exclude`` module."""
    builder = _Builder(tokenizer, seed, exclude)
    rng = builder.rng
    if num_prompts == 1:
        targets = [max_tokens]
    else:
        step = (max_tokens - min_tokens) / (num_prompts - 1)
        targets = [round(min_tokens + i * step) for i in range(num_prompts)]
    rng.shuffle(targets)
    needles = sum(KINDS[index % len(KINDS)] in NEEDLE_KINDS for index in range(num_prompts))
    shallow, deep = NEEDLE_DEPTHS
    depths = iter([shallow + (deep - shallow) * k / max(1, needles - 1) for k in range(needles)])
    prompts = []
    for index, target in enumerate(targets):
        kind = KINDS[index % len(KINDS)]
        if kind == "passkey":
            key = str(rng.randint(10000, 99999))
            depth = next(depths)
            needle = f"The secret pass key is {key}. Remember it: {key} is the secret pass key."
            question = "What is the secret pass key mentioned in the document above? Answer with the number only."
            primer = "The secret pass key is"

            def make(budget, needle=needle, question=question, primer=primer, depth=depth):
                paragraphs, used = builder.docstring_document(max(64, budget - 90))
                at = round(depth * len(paragraphs))
                paragraphs = paragraphs[:at] + [needle] + paragraphs[at:]
                return builder.encode("\n\n".join(paragraphs) + "\n\n" + question, primer), used

            ids, used = builder.fit(make, target)
            prompts.append(Prompt(index, kind, ids, key, depth, "+".join(used)))
        elif kind == "record":
            per_record = builder.count("Record 123: Tomoko Kowalski lives in Tallinn; her badge number is 48213.\n") + 1
            depth = next(depths)

            def make(budget, depth=depth, seed=rng.random()):
                count = max(8, (budget - 80) // per_record)
                records = _records(random.Random(seed), count)
                at = min(count - 1, int(depth * count))
                name, city, badge = records[at]
                lines = [f"Record {i + 1}: {n} lives in {c}; the badge number is {b}." for i, (n, c, b) in enumerate(records)]
                question = f"What is the badge number of {name}? Answer with the number only."
                ids = builder.encode("Personnel records:\n" + "\n".join(lines) + "\n\n" + question, f"The badge number of {name} is")
                return ids, badge

            ids, badge = builder.fit(make, target)
            prompts.append(Prompt(index, kind, ids, badge, depth, "records"))
        else:
            if kind == "summary":
                instruction = _SUMMARY_INSTRUCTIONS[(index // len(KINDS)) % len(_SUMMARY_INSTRUCTIONS)]
            elif kind == "long":
                instruction = _LONG_INSTRUCTIONS[(index // len(KINDS)) % len(_LONG_INSTRUCTIONS)]
            else:
                instruction = None

            def make(budget, instruction=instruction):
                paragraphs, used = builder.docstring_document(max(64, budget - 60))
                if instruction is None:  # qa: ask about one documented object
                    name = paragraphs[rng.randrange(len(paragraphs))].split(":", 1)[0]
                    question = f"According to the document above, what does `{name}` do? Answer in two sentences."
                else:
                    question = instruction
                return builder.encode("\n\n".join(paragraphs) + "\n\n" + question, ""), used

            ids, used = builder.fit(make, target)
            prompts.append(Prompt(index, kind, ids, None, None, "+".join(used)))
    return prompts


def answer_contains(answer: str, needle: str) -> bool:
    return needle in answer.replace(",", "")


# --- CPU contention probe (shared by the benchmarks) ----------------------------------------


class CpuMeter:
    """CPU seconds spent by a process tree and by everything else on the machine (Linux /proc).

    The benchmarks share a small machine; timings mean little if other jobs ran at the
    same time. ``sample()`` (call it every second or so while the tree runs) remembers
    each descendant's cumulative CPU time, so processes that exit are still counted up
    to their last sample. ``foreign_s`` = machine busy time - the tree's time - our own.
    """

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.tick = os.sysconf("SC_CLK_TCK")
        self.cpus = os.cpu_count() or 1
        self.started = time.time()
        self.busy0 = self._busy()
        self.own0 = self._own()
        self.tree: dict[int, float] = {}
        self.tree0: dict[int, float] = {}
        self.sample()
        self.tree0 = dict(self.tree)

    def _busy(self) -> float:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0
        return (user + nice + system + irq + softirq + steal) / self.tick

    def _own(self) -> float:
        times = os.times()
        return times.user + times.system

    def sample(self) -> None:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        members = {self.root_pid}
        changed = True
        while changed:
            changed = False
            for pid, parent in parents.items():
                if parent in members and pid not in members:
                    members.add(pid)
                    changed = True
        for pid in members:
            if pid in cpu:
                self.tree[pid] = max(self.tree.get(pid, 0.0), cpu[pid])

    def result(self) -> dict:
        self.sample()
        wall = time.time() - self.started
        busy = self._busy() - self.busy0
        tree = sum(v - self.tree0.get(pid, 0.0) for pid, v in self.tree.items())
        own = self._own() - self.own0
        foreign = max(0.0, busy - tree - own)
        return {
            "wall_s": wall,
            "machine_busy_s": busy,
            "benchmark_cpu_s": tree + own,
            "foreign_cpu_s": foreign,
            "foreign_share": foreign / (wall * self.cpus) if wall > 0 else 0.0,
        }


if __name__ == "__main__":  # python benchmarks/prompts.py: print what the benchmarks would use
    import argparse

    from transformers import AutoTokenizer

    from prefixkv_vllm.tools.demo_model import demo_model_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--min-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--show", type=int, default=-1, help="print the text of this prompt")
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(str(demo_model_path()))
    for p in build_prompts(tok, args.num_prompts, args.min_tokens, args.max_tokens):
        print(p.index, p.kind, p.num_tokens, p.needle, None if p.depth is None else round(p.depth, 2), p.source)
        if p.index == args.show:
            print(tok.decode(p.prompt_token_ids))
