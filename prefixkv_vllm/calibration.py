"""Offline calibration: per-layer keep ratios for a model, as a profile.

Runs the model in transformers on calibration prompts and accumulates each
layer's attention per KV head exactly as the ``importance`` op does in serving,
then applies the chosen scorer. Two allocation criteria
(``policy.costs.CRITERIA``):

* ``loss`` (the default): per prompt, the model first decodes ``positions`` tokens
  greedily on the full cache. Then, for each layer and each of a few keep ratios,
  only that layer's prompt keys are cut to the scorer's selection (as serving
  compacts them after prefill) and the KL divergence of the next-token
  distributions over those decoded positions, against the full cache, is that
  layer's cost at that ratio. The costs are averaged over prompts and the budget is
  shared where it costs least (``policy.costs.allocate_by_cost``). The costs do not
  depend on the budget, so a profile keeps them and serves any budget from them.
* ``attention`` (the paper's rule): per prompt, the PrefixKV search gives every
  layer the same share of its own attention mass; the kept fractions are averaged
  over prompts (the paper's offline mode).

The prompts are built from the Python standard library's own docstrings, so
calibration needs no download: ``documents`` (a document and an instruction),
``needles`` (a document with one locker code hidden at 10-90% depth, and the
question for it) and ``chat`` (a multi-turn conversation whose last question
refers back to an earlier turn); ``tasks`` picks which, cycled over the prompts.
The defaults are the server's (``PrefixKVConfig``): ``vllm serve --kv-policy
prefixkv`` without ``--kv-profile`` runs ``cached_calibration`` at start-up (once
per model and settings, logged, cached on disk), and ``prefixkv calibrate``
(``tools.calibrate``, the command line) writes the same profile.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
import time
import types
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from .config import PrefixKVConfig, default_cache_dir
from .policy import (
    CRITERIA,
    Profile,
    Protection,
    allocate_by_cost,
    average_keep_ratios,
    clamp_keep_counts,
    importance_curves,
    make_scorer,
    search_prefix_config,
    select_tokens,
)
from .policy.layers import full_attention_layers
from .policy.profile import LayerCosts, ModelIdentity
from .policy.scorers import Scorer

RECIPE_VERSION = 2  # 2: prompts of up to 2048 tokens
SERVING = PrefixKVConfig()  # the server's defaults are calibration's: one default per setting
TASKS = ("documents", "needles", "chat")  # all of them by default (the measured loss profiles used the three)
# Keep ratios at which the loss criterion measures each layer (1.0, which costs nothing, is implied).
# Measured (benchmarks/results/quality-default.md): these 8 against (0.05, 0.1, 0.2, 0.4, 0.7) gave
# ROUGE-L +0.041 at budget 0.5 and +0.008 at 0.2, for 41% more calibration time.
LOSS_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.55, 0.7, 0.85)
LOSS_POSITIONS = 32  # decoded tokens whose next-token distributions are compared
# Calibration prompts, and the most tokens of each. The loss criterion's smallest ratio must cut
# below the sink and recent tokens every prompt keeps (65 by default: 1300 tokens at 0.05); at 1024
# it never did, and the layers measured cheapest got a floor they had not been measured at.
# Measured (docs/benchmarks.md, issue 29), 2048 against 1024 over 120 prompts of the demo model and
# Gemma 3: ROUGE-L +0.052 [+0.016, +0.091] at the default budget 0.2, -0.040 [-0.076, -0.006] at 0.5
# (a trade, chosen for the default budget).
NUM_PROMPTS, MAX_TOKENS = 8, 2048
# The standard-library modules whose docstrings make the calibration documents (benchmarks leave them out to test on unseen text).
DOCUMENT_MODULES = ("argparse", "json", "logging", "pathlib", "subprocess", "threading", "collections", "itertools")
_INSTRUCTIONS = (
    "Summarize the document above in three sentences.",
    "List the main functions the document above describes.",
    "What problem does the module described above solve?",
    "Write one question a new user might ask after reading the document above, and answer it.",
)
_LOCKERS = ("red", "blue", "green", "yellow", "orange", "purple", "silver", "black")

T = TypeVar("T")
# Wraps one loop of the calibration so that it can be watched: (items, description, count) -> items.
Progress = Callable[[Iterable[T], str, int], Iterable[T]]


def _unwatched(items: Iterable[T], description: str, total: int) -> Iterable[T]:
    return items


def _docstrings(module_name: str) -> list[tuple[str, str]]:
    module = __import__(module_name)
    return [(name, doc) for name, obj in sorted(vars(module).items()) if (doc := inspect.getdoc(obj)) and len(doc) > 200]


def _encode(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return list(ids)


def _document_prompt(index: int, budget_chars: int) -> list[dict]:
    document = "\n\n".join(doc for _, doc in _docstrings(DOCUMENT_MODULES[index % len(DOCUMENT_MODULES)]))
    instruction = _INSTRUCTIONS[index % len(_INSTRUCTIONS)]
    return [{"role": "user", "content": f"{document[:budget_chars]}\n\n{instruction}"}]


def _needle_prompt(index: int, budget_chars: int) -> list[dict]:
    rng = random.Random(index)
    # Another module than the documents task's prompt of the same index, so the two tasks differ.
    module = DOCUMENT_MODULES[(index + 3) % len(DOCUMENT_MODULES)]
    document = "\n\n".join(doc for _, doc in _docstrings(module))[:budget_chars]
    locker, code = _LOCKERS[index % len(_LOCKERS)], rng.randint(10000, 99999)
    at = max(0, document.rfind("\n\n", 0, round(rng.uniform(0.1, 0.9) * len(document))))
    document = f"{document[:at]}\n\nThe code of the {locker} locker is {code}.{document[at:]}"
    question = f"What is the code of the {locker} locker? Answer with the number only."
    return [{"role": "user", "content": f"{document}\n\n{question}"}]


def _chat_prompt(index: int, budget_chars: int) -> list[dict]:
    rng = random.Random(index)
    messages, used = [], 0
    entries = [(name, doc) for name, doc in _docstrings(DOCUMENT_MODULES[(index + 5) % len(DOCUMENT_MODULES)]) if not name.startswith("_")]
    for name, doc in entries:
        answer = doc.split("\n\n")[0]
        used += len(answer) + len(name) + 40
        if messages and used > budget_chars:
            break
        messages += [{"role": "user", "content": f"What does `{name}` do?"}, {"role": "assistant", "content": answer}]
    asked = messages[2 * rng.randrange(len(messages) // 2)]["content"].split("`")[1]
    messages.append({"role": "user", "content": f"Earlier you explained `{asked}`. Remind me in one sentence what it is for."})
    return messages


_TASK_PROMPTS = types.MappingProxyType({"documents": _document_prompt, "needles": _needle_prompt, "chat": _chat_prompt})


def calibration_prompts(tokenizer, num_prompts: int, max_tokens: int, tasks: Sequence[str] = ("documents",)) -> list[list[int]]:
    """``num_prompts`` prompts, cycling over ``tasks``, each at most ``max_tokens`` tokens (its end kept)."""
    unknown = [task for task in tasks if task not in _TASK_PROMPTS]
    if unknown or not tasks:
        raise ValueError(f"calibration tasks must be some of {', '.join(TASKS)}, got {list(tasks)}")
    budget_chars = max_tokens * 3  # keeps the text well inside max_tokens before templating
    return [
        _encode(tokenizer, _TASK_PROMPTS[tasks[index % len(tasks)]](index, budget_chars))[-max_tokens:]
        for index in range(num_prompts)
    ]


@torch.no_grad()
def layer_attention(model, input_ids: list[int], min_query_pos: int, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """Per layer in ``layers``, the attention each token receives from queries at ``>= min_query_pos``: ``[Hkv, S]``."""
    return _prefill(model, input_ids, min_query_pos, layers)[1]


def _prefill(model, input_ids: list[int], min_query_pos: int, layers: tuple[int, ...]):
    """The prompt's forward pass: its outputs (logits, cache) and ``layer_attention``.

    Only the queries from ``min_query_pos`` on need their attention probabilities,
    which only eager attention returns; the prompt before them runs in the model's
    own implementation (SDPA from ``load_model``): the demo model's 1747-token
    prefill took 4.4 s in SDPA against 11.0 s in eager (2 CPU cores).
    """
    ids = torch.tensor([input_ids], device=model.device)
    cache = None
    if min_query_pos > 0:
        cache = model(ids[:, :min_query_pos], use_cache=True).past_key_values
    with _attention_implementation(model, "eager"):
        outputs = model(ids[:, min_query_pos:], past_key_values=cache, output_attentions=True, use_cache=True)
    return outputs, _accumulated(model, outputs.attentions, layers)


@contextlib.contextmanager
def _attention_implementation(model, implementation: str) -> Iterator[None]:
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _accumulated(model, attentions, layers: tuple[int, ...]) -> list[torch.Tensor]:
    num_kv_heads = _num_kv_heads(model.config.get_text_config())
    accumulated = []
    for layer in layers:
        probs = attentions[layer]  # [1, Hq, queries, S], softmax of the layer's own scaled logits
        received = probs[0].float().sum(dim=1).cpu()  # [Hq, S]; scorers run on the CPU
        accumulated.append(received.view(num_kv_heads, -1, received.shape[-1]).mean(dim=1))
    return accumulated


def _num_kv_heads(text_config) -> int:
    return getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads


def _attention_modules(model, num_layers: int) -> dict[int, torch.nn.Module]:
    """The language model's attention module of each layer, by layer index."""
    found = {
        module.layer_idx: module
        for name, module in model.named_modules()
        if name.endswith("self_attn") and "vision" not in name and isinstance(getattr(module, "layer_idx", None), int)
    }
    if sorted(found) != list(range(num_layers)):
        raise ValueError(f"found attention modules for layers {sorted(found)}, expected 0..{num_layers - 1}")
    return found


def _decoder_layers(model, attention: dict[int, torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """Each layer's decoder block (the parent of its module in ``attention``), by layer index."""
    names = {module: name for name, module in model.named_modules()}
    return {i: model.get_submodule(names[a].rpartition(".")[0]) for i, a in attention.items()}


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _recording_inputs(decoder_layers: dict[int, torch.nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """While active, each decoder layer's input hidden states are recorded, by layer index."""
    inputs: dict[int, torch.Tensor] = {}

    def recorder(index: int):
        def record(module, args, kwargs):
            inputs[index] = _layer_input(args, kwargs)

        return record

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in decoder_layers.items()]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _passed_through(*args, **kwargs) -> torch.Tensor:
    return _layer_input(args, kwargs)


@contextlib.contextmanager
def _starting_at(decoder_layers: dict[int, torch.nn.Module], first: int, hidden: torch.Tensor) -> Iterator[None]:
    """While active, the decoder layers before ``first`` compute nothing and layer ``first`` reads ``hidden``.

    Cutting one layer's prompt keys changes nothing before that layer, so its
    measurement can start from the reference pass's input to it: the demo model's
    30 layers took 26.4 s instead of 40.5 s on a 1747-token prompt (2 CPU cores),
    with the same costs. The skipped layers' caches do not grow: crop only the
    layers from ``first`` on (``_continuation_log_probs``).
    """

    def feed(module, args, kwargs):
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = decoder_layers[first].register_forward_pre_hook(feed, with_kwargs=True)
    for i in range(first):
        decoder_layers[i].forward = _passed_through  # an instance attribute: nn.Module calls it instead
    try:
        yield
    finally:
        handle.remove()
        for i in range(first):
            del decoder_layers[i].forward


@contextlib.contextmanager
def _evicting(attention: torch.nn.Module, evicted: torch.Tensor, prompt_len: int) -> Iterator[None]:
    """While active, queries after the prompt cannot see the ``evicted`` prompt keys of this one layer.

    Replaces the layer's attention mask with causal attention over the cached
    prompt and the new tokens, minus the evicted prompt tokens: what the layer's
    compacted cache shows a decoded token in serving. ``evicted``: ``[B, prompt_len]``,
    one row per sequence of the batch.
    """

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        queries = hidden.shape[1]
        causal = torch.ones(queries, prompt_len + queries, dtype=torch.bool, device=hidden.device).triu(prompt_len + 1)
        blocked = causal.repeat(evicted.shape[0], 1, 1)
        blocked[:, :, :prompt_len] |= evicted.to(hidden.device)[:, None, :]
        mask = torch.zeros(blocked.shape, dtype=hidden.dtype, device=hidden.device)
        kwargs["attention_mask"] = mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)[:, None]
        return args, kwargs

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _continuation_log_probs(model, continuation: torch.Tensor, cache, first_layer: int = 0) -> torch.Tensor:
    """Log-probabilities ``[B, P, V]`` after each continuation token on the cached prompt; the cache is left as it was.

    ``first_layer``: the first layer that runs (``_starting_at``); the caches before it did not grow.
    """
    logits = model(continuation, past_key_values=cache, use_cache=True).logits
    for layer in cache.layers[first_layer:]:
        layer.crop(-continuation.shape[1])
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def layer_costs(
    model,
    input_ids: list[int],
    layers: tuple[int, ...],
    token_scorer: Scorer,
    protection: Protection,
    ratios: Sequence[float],
    positions: int = LOSS_POSITIONS,
    progress: Progress = _unwatched,
) -> torch.Tensor:
    """``[len(layers), len(ratios)]``: mean KL(full cache || only that layer compressed) over ``positions`` decoded tokens."""
    prompt_len = len(input_ids)
    outputs, accumulated = _prefill(model, input_ids, token_scorer.min_query_pos(prompt_len), layers)
    scores = [token_scorer.scores(a, prompt_len) for a in accumulated]
    cache = outputs.past_key_values
    cache.activate_past_recording()  # so that sliding-window layers can be cropped back to the prompt
    # The first decoded token comes from the prefill, before serving compacts the cache: it is never affected.
    generated = [int(outputs.logits[0, -1].argmax())]
    del outputs
    for _ in range(positions - 1):
        step = model(torch.tensor([[generated[-1]]], device=model.device), past_key_values=cache, use_cache=True)
        generated.append(int(step.logits[0, -1].argmax()))
    cache.crop(-(positions - 1))
    continuation = torch.tensor([generated], device=model.device)
    num_layers = model.config.get_text_config().num_hidden_layers
    attention = _attention_modules(model, num_layers)
    decoder_layers = _decoder_layers(model, attention)
    with _recording_inputs(decoder_layers) as inputs:
        reference = _continuation_log_probs(model, continuation, cache)[0]
    _check_starting_at(model, continuation, cache, decoder_layers, inputs, layers[-1], reference)
    # All ratios of a layer run as one batch, on the prompt's cache repeated once per ratio:
    # the demo model's 5-ratio calibration took 156 s instead of 243 s one ratio at a time
    # (2 CPU cores), with costs equal to 1e-6 and the same allocation.
    cache.batch_repeat_interleave(len(ratios))
    continuation = continuation.expand(len(ratios), -1)
    counts = clamp_keep_counts(torch.tensor([round(r * prompt_len) for r in ratios]), prompt_len, protection).tolist()
    costs = torch.zeros(len(layers), len(ratios))
    for i in progress(range(len(layers)), "layers", len(layers)):
        evicted = torch.ones(len(ratios), prompt_len, dtype=torch.bool)
        for j, count in enumerate(counts):
            evicted[j, select_tokens(scores[i], count, protection)[0]] = False
        start = inputs[layers[i]].expand(len(ratios), -1, -1)
        with _evicting(attention[layers[i]], evicted, prompt_len), _starting_at(decoder_layers, layers[i], start):
            compressed = _continuation_log_probs(model, continuation, cache, first_layer=layers[i])
        costs[i] = (reference.exp() * (reference - compressed)).sum(dim=-1).mean(dim=-1).clamp_min(0.0).cpu()
    return costs


def _check_starting_at(model, continuation, cache, decoder_layers, inputs, first: int, reference: torch.Tensor) -> None:
    """Fails if starting at layer ``first`` without evicting anything does not reproduce the full pass.

    ``_starting_at`` assumes that a layer reads nothing from the ones before it but its
    input hidden states; a model (or transformers version) where that does not hold
    fails here, at calibration, rather than giving wrong costs.
    """
    with _starting_at(decoder_layers, first, inputs[first]):
        started = _continuation_log_probs(model, continuation, cache, first_layer=first)[0]
    if not torch.allclose(started, reference, rtol=1e-3, atol=1e-4):
        raise RuntimeError(
            f"calibration: running {type(model).__name__} from layer {first} does not reproduce the full pass "
            f"(max |Δ log p| {float((started - reference).abs().max()):.2e}); this model is not supported by the loss criterion"
        )


def load_model(model_path: str, device: str):
    """Tokenizer, model (fp32, SDPA attention, on ``device``), its text config and its compressed layers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    # Vision-language models are calibrated on the same text-only prompts (no image data offline).
    text_config = config.get_text_config()
    auto_class = AutoModelForCausalLM if text_config is config else AutoModelForImageTextToText
    model = auto_class.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    ).eval().to(device)
    # Only the full-attention layers are compressed; the others keep vLLM's own cache.
    layers = full_attention_layers(text_config, text_config.num_hidden_layers)
    if not layers:
        raise ValueError(f"{model_path} has no full-attention layers: nothing to calibrate")
    return tokenizer, model, text_config, layers


def calibrate(
    model_path: str,
    budgets: list[float],
    *,
    scorer: str = SERVING.scorer,
    window: int = SERVING.window,
    num_prompts: int = NUM_PROMPTS,
    max_tokens: int = MAX_TOKENS,
    criterion: str = SERVING.criterion,
    tasks: Sequence[str] = TASKS,
    sink: int = SERVING.sink,
    recent: int = SERVING.recent,
    loss_ratios: Sequence[float] = LOSS_RATIOS,
    positions: int = LOSS_POSITIONS,
    device: str = "cpu",
    progress: Progress = _unwatched,
) -> Profile:
    """A profile with one entry per budget. ``sink``, ``recent``, ``loss_ratios`` and ``positions`` are the loss criterion's."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion == "loss":  # fail before the long part
        _check_loss_budget(min(budgets), loss_ratios)
    started = time.time()
    tokenizer, model, text_config, layers = load_model(model_path, device)
    token_scorer = make_scorer(scorer, window=window)
    protection = Protection(sink=sink, recent=recent)
    prompts = calibration_prompts(tokenizer, num_prompts, max_tokens, tasks)
    counts = {budget: [] for budget in budgets}
    costs_per_prompt = []
    for input_ids in progress(prompts, "calibration prompts", len(prompts)):
        prompt_len = len(input_ids)
        if criterion == "loss":
            costs_per_prompt.append(layer_costs(model, input_ids, layers, token_scorer, protection, loss_ratios, positions, progress))
            continue
        accumulated = layer_attention(model, input_ids, token_scorer.min_query_pos(prompt_len), layers)
        layer_scores = torch.stack([token_scorer.scores(a, prompt_len)[0] for a in accumulated])
        curves = importance_curves(layer_scores)
        for budget in budgets:
            counts[budget].append(search_prefix_config(curves, budget).tolist())
    lengths = [len(p) for p in prompts]
    provenance = {
        "tool": "prefixkv calibrate",
        "recipe": RECIPE_VERSION,
        "criterion": criterion,
        "tasks": list(tasks),
        "model_path": str(model_path),
        "samples": len(lengths),
        "prompt_tokens": lengths,
        "window": window,
    }
    costs = None
    if criterion == "loss":
        mean_costs = torch.stack(costs_per_prompt).mean(dim=0)
        entries = {budget: allocate_by_cost(loss_ratios, mean_costs, budget) for budget in budgets}
        # Kept whole (not rounded): Profile.keep_ratios allocates other budgets from them as here.
        costs = LayerCosts(loss_ratios, mean_costs.tolist())
        provenance.update(sink=sink, recent=recent, positions=positions)
    else:
        entries = {budget: average_keep_ratios(counts[budget], lengths) for budget in budgets}
    identity = ModelIdentity(
        name=Path(model_path).name,
        num_layers=len(layers),
        num_kv_heads=_num_kv_heads(text_config),
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads,
        layers=layers,
    )
    provenance["seconds"] = round(time.time() - started, 1)
    return Profile(identity, scorer, entries, provenance, costs)


def logged_progress(logger: logging.Logger, what: str) -> Progress:
    """Progress through ``logger``: about ten lines per loop, however long it is."""

    def progress(items, description, total):
        shown = -1
        for done, item in enumerate(items):
            if done * 10 // max(1, total) != shown:
                shown = done * 10 // max(1, total)
                logger.info("PrefixKV: calibrating %s: %s %d/%d", what, description, done + 1, total)
            yield item

    return progress


def _check_loss_budget(budget: float, loss_ratios: Sequence[float]) -> None:
    if budget < loss_ratios[0]:
        raise ValueError(
            f"the loss criterion measures keep ratios from {loss_ratios[0]:g}; budget {budget:g} is below "
            "(use the attention criterion, or a uniform policy)"
        )


def cached_calibration(model_path: str, budget: float, config: PrefixKVConfig = SERVING) -> Profile:
    """``calibrate`` with the server's settings, cached on disk by model files and settings.

    A loss calibration is cached once for every budget (its costs do not depend on
    one: ``Profile.keep_ratios``); an attention calibration once per budget.
    """
    if config.criterion == "loss":
        _check_loss_budget(budget, LOSS_RATIOS)  # fail before the long part
    config_file = Path(model_path) / "config.json"
    identity = config_file.read_bytes() if config_file.exists() else str(model_path).encode()
    settings = [config.criterion, config.scorer, config.window, list(TASKS)]
    settings += [config.sink, config.recent, LOSS_RATIOS, LOSS_POSITIONS] if config.criterion == "loss" else [budget]
    key = json.dumps([RECIPE_VERSION, str(Path(model_path).resolve()), *settings]).encode()
    digest = hashlib.sha256(key + identity).hexdigest()[:16]
    path = default_cache_dir() / "profiles" / f"{Path(model_path).name}-{digest}.json"
    if path.exists():
        return Profile.load(path)  # keep_ratios allocates a loss profile's other budgets
    # Under "vllm" so that vLLM's log handlers show it at start-up.
    progress = logged_progress(logging.getLogger("vllm.prefixkv"), Path(model_path).name)
    profile = calibrate(
        model_path, [budget], scorer=config.scorer, window=config.window, criterion=config.criterion,
        sink=config.sink, recent=config.recent, progress=progress,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    profile.save(temporary)
    os.replace(temporary, path)
    return profile
