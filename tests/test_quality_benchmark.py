"""benchmarks/quality.py and benchmarks/prompts.py: the metric, the paired intervals, the prompt set."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_rouge_l_is_the_library_metric():
    from benchmarks.quality import rouge_l_f1

    assert rouge_l_f1("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS 5 of 5 candidate and 6 reference tokens: F1 = 2 * 1 * 5/6 / (1 + 5/6)
    assert rouge_l_f1("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l_f1("Hello, World!", "hello world") == 1.0  # case and punctuation are not words
    assert rouge_l_f1("", "") == 1.0 and rouge_l_f1("", "an answer") == 0.0


def test_paired_interval():
    from benchmarks.quality import paired_interval

    assert paired_interval([0.25] * 10) == (0.25, 0.25, 0.25)
    mean, low, high = paired_interval([0.1, 0.3, 0.2, 0.4, 0.0, 0.2, 0.3, 0.1])
    assert low > 0 and low < mean < high
    assert paired_interval([1, -1, 0, 1, -1, 0]) == paired_interval([1, -1, 0, 1, -1, 0])  # seeded
    mean, low, high = paired_interval([1, -1, 0, 1, -1, 0])
    assert low < 0 < high


def row(policy, scorer, rouge, needle, budget=0.2, **extra):
    return {
        "policy": policy, "scorer": scorer, "budget": budget, "name": f"{policy}/{scorer}@{budget}",
        "rouge_per_prompt": rouge, "needle_per_prompt": needle, "rouge_mean": sum(rouge) / len(rouge), **extra,
    }  # fmt: skip


def test_comparisons_pair_each_configuration_with_its_uniform_baseline():
    from benchmarks.quality import comparisons

    rows = [
        {"policy": "none", "name": "full cache"},
        row("uniform", "window", [0.5, 0.5, 0.5], [0, 1]),
        row("uniform", "snapkv", [0.6, 0.7, 0.5], [1, 1]),
        row("prefixkv", "snapkv", [0.6, 0.7, 0.6], [1, 1]),
        row("prefixkv", "window", [0.4, 0.5, 0.5], [0, 0], profile="p.json", criterion="loss"),
        row("prefixkv", "window", [0.5, 0.5, 0.5], [0, 1], budget=0.5),  # no uniform at 0.5
        {"policy": "streaming", "budget": 0.2, "name": "streaming", "rouge_per_prompt": [0.5, 0.4, 0.3], "needle_per_prompt": [0, 1]},
    ]
    compared = comparisons(rows)
    # prefixkv/window is also compared with uniform's best scorer (snapkv, by mean ROUGE-L);
    # other uniform rows and streaming with uniform at the server's default scorer (snapkv).
    assert [(c["name"], c["baseline"]) for c in compared] == [
        ("uniform/window@0.2", "uniform/snapkv@0.2"),
        ("prefixkv/snapkv@0.2", "uniform/snapkv@0.2"),
        ("prefixkv/window@0.2", "uniform/window@0.2"),
        ("prefixkv/window@0.2", "uniform/snapkv@0.2"),
        ("streaming", "uniform/snapkv@0.2"),
    ]
    assert compared[1]["rouge"][0] == pytest.approx(0.1 / 3)
    assert compared[2]["needle"] == (-0.5, -1.0, 0.0)


def test_pooling_concatenates_prompt_sets_and_pairs_them():
    from benchmarks.quality_pool import pool

    run_a = {"rows": [row("uniform", "snapkv", [0.5, 0.5], [0]), row("prefixkv", "snapkv", [0.7, 0.5], [1]), row("uniform", "window", [0.1, 0.1], [0])]}
    run_b = {"rows": [row("prefixkv", "snapkv", [0.6], [1, 0]), row("uniform", "snapkv", [0.6], [0, 0])]}
    for rows in (run_a["rows"], run_b["rows"]):
        for r in rows:
            r.update(n=len(r["rouge_per_prompt"]), needle_hits=sum(r["needle_per_prompt"]), needle_n=len(r["needle_per_prompt"]))
    pooled = pool([run_a, run_b])
    assert [r["name"] for r in pooled] == ["uniform/snapkv@0.2", "prefixkv/snapkv@0.2"]  # window ran only once
    assert pooled[1]["rouge_per_prompt"] == [0.7, 0.5, 0.6] and pooled[1]["needle_per_prompt"] == [1, 1, 0]
    assert pooled[1]["rouge_mean"] == pytest.approx(0.6) and pooled[1]["needle_hits"] == 2
    assert pooled[1]["per_run"] == [(0.6, 1, 1), (0.6, 1, 2)]


def test_pooling_refuses_the_same_prompts_twice(tmp_path):
    import json

    from benchmarks.quality_pool import main

    run = tmp_path / "run.json"
    run.write_text(json.dumps({"prompts": [{"kind": "qa"}], "rows": [row("uniform", "snapkv", [0.5], [])]}))
    with pytest.raises(SystemExit):
        main([str(run), str(run), "--out-dir", str(tmp_path)])


def test_profiles_run_at_their_budgets():
    from benchmarks.quality import additional_config, config_name, configurations

    configs = configurations([0.2, 0.5], ["uniform"], ["window"], profiles=[("/p/loss.json", "snapkv", "loss", (0.2,))])
    profiled = [c for c in configs if "profile" in c]
    assert profiled == [{"policy": "prefixkv", "budget": 0.2, "scorer": "snapkv", "profile": "/p/loss.json", "criterion": "loss"}]
    assert additional_config(profiled[0])["kv_profile"] == "/p/loss.json"
    assert config_name(profiled[0]) == "prefixkv (loss profile loss)/snapkv@0.2"


def test_criteria_pick_the_start_up_calibration():
    from benchmarks.quality import additional_config, config_name, configurations

    configs = configurations([0.2], ["uniform", "prefixkv"], ["snapkv"], criteria=["attention", "loss"])
    assert [config_name(c) for c in configs[1:]] == ["uniform/snapkv@0.2", "prefixkv (attention criterion)/snapkv@0.2", "prefixkv/snapkv@0.2"]
    assert additional_config(configs[2])["kv_criterion"] == "attention" and "kv_criterion" not in additional_config(configs[3])
    # The server's default (loss) is the same configuration with or without --criteria.
    assert configs[3] == configurations([0.2], ["prefixkv"], ["snapkv"])[1]


def test_tiers_run_prefixkv_with_fewer_groups():
    from benchmarks.quality import additional_config, config_name, configurations

    configs = configurations([0.2], ["uniform", "prefixkv"], ["snapkv"], tiers=[0, 3])
    assert [config_name(c) for c in configs[1:]] == ["uniform/snapkv@0.2", "prefixkv/snapkv@0.2", "prefixkv, 3 tiers/snapkv@0.2"]
    assert additional_config(configs[3])["kv_tiers"] == 3 and "kv_tiers" not in additional_config(configs[2])
    # The server's default (one group per layer) is the same configuration with or without --tiers.
    assert configs[2] == configurations([0.2], ["prefixkv"], ["snapkv"])[1]


def test_intervals_apply_to_evicting_decode_modes():
    from benchmarks.quality import additional_config, config_name, configurations
    from prefixkv_vllm.config import PrefixKVConfig

    default = PrefixKVConfig.decode_interval
    other = 4 * default
    configs = configurations([0.2], ["prefixkv"], ["snapkv"], decode_modes=["off", "fifo"], intervals=[other, default])
    names = [config_name(c) for c in configs[1:]]
    assert names == ["prefixkv/snapkv@0.2 decode off", f"prefixkv/snapkv@0.2 decode fifo every {other}", "prefixkv/snapkv@0.2 decode fifo"]
    assert additional_config(configs[2])["kv_decode_interval"] == other and "kv_decode_interval" not in additional_config(configs[3])
    # The server's default interval is the same configuration with or without --intervals.
    assert configs[3] == configurations([0.2], ["prefixkv"], ["snapkv"], decode_modes=["off", "fifo"])[2]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from prefixkv_vllm.tools.demo_model import demo_model_path

    return AutoTokenizer.from_pretrained(str(demo_model_path()))


def test_prompt_set_spreads_needles_and_has_long_outputs(tokenizer):
    from benchmarks.prompts import _LONG_INSTRUCTIONS, NEEDLE_KINDS, build_prompts

    prompts = build_prompts(tokenizer, 48, 300, 600)
    assert len(prompts) == 48
    kinds = {p.kind for p in prompts}
    assert {"summary", "qa", "long"} <= kinds
    depths = sorted(p.depth for p in prompts if p.kind in NEEDLE_KINDS)
    assert len(depths) >= 16 and depths[0] == pytest.approx(0.1) and depths[-1] == pytest.approx(0.9)
    steps = [b - a for a, b in zip(depths, depths[1:])]
    assert max(steps) == pytest.approx(min(steps))  # evenly spread, not clustered
    for kind in NEEDLE_KINDS:  # each needle kind covers shallow and deep needles
        own = [p.depth for p in prompts if p.kind == kind]
        assert min(own) < 0.2 and max(own) > 0.8
    long = tokenizer.decode(next(p for p in prompts if p.kind == "long").prompt_token_ids)
    assert any(instruction in long for instruction in _LONG_INSTRUCTIONS)


def test_prompts_can_leave_out_the_calibration_documents(tokenizer):
    from benchmarks.prompts import build_prompts
    from prefixkv_vllm.calibration import DOCUMENT_MODULES

    sources = {m for p in build_prompts(tokenizer, 24, 300, 600) for m in p.source.split("+")}
    assert sources & set(DOCUMENT_MODULES)  # without exclude, the calibration's modules are drawn
    held_out = build_prompts(tokenizer, 24, 300, 600, exclude=DOCUMENT_MODULES)
    assert not {m for p in held_out for m in p.source.split("+")} & set(DOCUMENT_MODULES)


def test_kvpress_runs_split_the_question_where_the_prompt_builder_put_it(tokenizer):
    from benchmarks.kvpress_baselines import question_start
    from benchmarks.prompts import build_prompts

    for prompt in build_prompts(tokenizer, 8, 300, 600):
        ids = prompt.prompt_token_ids
        question = tokenizer.decode(ids[question_start(tokenizer, ids) :])
        assert "\n\n" not in question and ("?" in question or "ummar" in question or "Write" in question), question
        assert len(tokenizer(question)["input_ids"]) < 90  # the question and template, not the document


def test_presses_run_on_full_attention_layers_only_with_the_layers_rope():
    from types import SimpleNamespace

    from benchmarks.kvpress_baselines import on_full_attention_layers

    seen = []

    class Press:  # kvpress's interface: a forward hook on every attention module
        def forward_hook(self, module, input, kwargs, output):
            seen.append(module.rotary_emb(None, None) if hasattr(module, "rotary_emb") else "no rope")
            return "compressed"

    def rope(x, position_ids, layer_type=None):  # Gemma 3's rotary embedding needs the layer type
        return layer_type

    press = Press()
    on_full_attention_layers(press)
    sliding = SimpleNamespace(is_sliding=True, layer_type="sliding_attention", rotary_emb=rope)
    full = SimpleNamespace(is_sliding=False, layer_type="full_attention", rotary_emb=rope)
    assert press.forward_hook(sliding, (), {}, "output") == "output"
    assert press.forward_hook(full, (), {}, "output") == "compressed"
    assert full.rotary_emb is rope  # restored after the hook
    assert press.forward_hook(SimpleNamespace(), (), {}, "output") == "compressed"  # a model without layer types
    assert seen == ["full_attention", "no rope"]


def test_kvpress_comparison_pairs_every_press_with_our_default_at_its_budget():
    from benchmarks.kvpress_compare import our_default, press_configs
    from benchmarks.quality import config_name
    from prefixkv_vllm.config import PrefixKVConfig

    # the very configuration quality.py runs for the server's defaults, so saved answers are shared
    assert our_default(0.2) == {"policy": "prefixkv", "budget": 0.2, "recent": PrefixKVConfig.recent, "scorer": PrefixKVConfig.scorer}
    configs = press_configs([0.2, 0.5], ["snapkv", "tova"], ["snapkv"])
    names = [config_name(c) for c in configs]
    assert names[0] == "full cache (transformers)" and len(names) == len(set(names)) == 7
    assert "kvpress snapkv@0.5 (context only)" in names and "kvpress tova@0.2" in names
