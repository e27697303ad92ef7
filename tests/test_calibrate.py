"""Calibration (``prefixkv_vllm.calibration``) and ``prefixkv calibrate``: prompts, the loss criterion's measurement,
start-up calibration, and what users see."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging

import pytest
import torch

from prefixkv_vllm import calibration as cal
from prefixkv_vllm.policy import Profile, ProfileError, Protection, WindowScorer, allocate_by_cost
from prefixkv_vllm.policy.layers import full_attention_layers
from prefixkv_vllm.policy.profile import LayerCosts, ModelIdentity
from prefixkv_vllm.tools import calibrate as cli

from .settings import DEFAULT_PROFILE


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def one_layer(model):
    """The same weights with only the first decoder layer."""
    from transformers import LlamaForCausalLM

    config = model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": 1})
    config._attn_implementation = "eager"
    small = LlamaForCausalLM(config).eval()
    small.load_state_dict(model.state_dict(), strict=False)
    return small


@torch.no_grad()
def test_evicting_matches_a_cache_without_those_tokens(tiny_llama):
    # Layer 0's keys depend only on each token and its position, so a run over the kept
    # prompt tokens at their true positions is what a compacted layer-0 cache gives.
    model = one_layer(tiny_llama)
    prompt = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    continuation = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    evicted = torch.zeros(2, 40, dtype=torch.bool)  # a batch of two selections, as layer_costs runs its ratios
    evicted[0, [3, 7, 8, 20, 33]] = True
    evicted[1, [0, 1, 2, 30]] = True
    cache = model(prompt, use_cache=True).past_key_values
    cache.batch_repeat_interleave(2)
    with cal._evicting(cal._attention_modules(model, 1)[0], evicted, 40):
        hooked = cal._continuation_log_probs(model, continuation.expand(2, -1), cache)
    for row in range(2):
        kept = (~evicted[row]).nonzero().squeeze(1)
        positions = torch.cat([kept, torch.arange(40, 46)])[None]
        direct = model(torch.cat([prompt[:, kept], continuation], dim=1), position_ids=positions).logits[0, -6:]
        torch.testing.assert_close(hooked[row], torch.log_softmax(direct, dim=-1), rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 40  # the measurement leaves the prompt's cache as it found it
    unhooked = cal._continuation_log_probs(model, continuation.expand(2, -1), cache)
    assert not torch.allclose(hooked[0], unhooked[0], atol=1e-3)  # the eviction changed something


def tiny_gemma3(sliding_window=8):
    """A random 3-layer Gemma 3: two sliding-window layers, then a full-attention one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], attn_implementation="eager",
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_starting_at_a_layer_gives_the_full_pass(arch, tiny_llama):
    # layer_costs measures a cut in layer k from the reference pass's input to layer k,
    # without running the layers before it; on Gemma 3 the skipped layers are sliding
    # ones past their window. With and without the skip, the same cut gives the same answer.
    model = tiny_llama if arch == "llama" else tiny_gemma3()
    num_layers = model.config.num_hidden_layers
    first = num_layers - 1
    prompt = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(6))
    continuation = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(7))
    cache = model(prompt, use_cache=True).past_key_values
    cache.activate_past_recording()
    decoder_layers = cal._decoder_layers(model, cal._attention_modules(model, num_layers))
    with cal._recording_inputs(decoder_layers) as inputs:
        cal._continuation_log_probs(model, continuation, cache)
    assert sorted(inputs) == list(range(num_layers)) and inputs[first].shape == (1, 5, 32)
    cache.batch_repeat_interleave(2)
    evicted = torch.zeros(2, 40, dtype=torch.bool)
    evicted[0, 5:30] = True
    evicted[1, ::3] = True
    attention = cal._attention_modules(model, num_layers)[first]
    with cal._evicting(attention, evicted, 40):
        full = cal._continuation_log_probs(model, continuation.expand(2, -1), cache)
        with cal._starting_at(decoder_layers, first, inputs[first].expand(2, -1, -1)):
            started = cal._continuation_log_probs(model, continuation.expand(2, -1), cache, first_layer=first)
    torch.testing.assert_close(started, full, rtol=1e-5, atol=1e-5)
    untouched = model(prompt, use_cache=True).past_key_values
    assert [layer.get_seq_length() for layer in cache.layers] == [layer.get_seq_length() for layer in untouched.layers]
    assert all("forward" not in vars(layer) for layer in decoder_layers.values())  # the skipped layers are themselves again
    with pytest.raises(RuntimeError, match="does not reproduce the full pass"):
        wrong = {first: inputs[first] + 1.0}  # what a layer that reads more than its input hidden states would give
        cache.batch_select_indices(torch.tensor([0]))
        cal._check_starting_at(model, continuation, cache, decoder_layers, wrong, first, full[:1].clone()[0])


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefill_in_sdpa_gives_the_eager_attention_and_logits(arch, tiny_llama):
    # Only the scorer's last queries run in eager attention (the rest in SDPA); their
    # attention and the prompt's logits and cache are those of one eager pass.
    eager = tiny_llama if arch == "llama" else tiny_gemma3()
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    prompt = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(8))
    whole = eager(prompt, output_attentions=True, use_cache=True)
    layers = full_attention_layers(eager.config, eager.config.num_hidden_layers)  # what calibration measures
    outputs, accumulated = cal._prefill(sdpa, prompt[0].tolist(), 32, layers)
    assert sdpa.config._attn_implementation == "sdpa"
    kv_heads = eager.config.num_key_value_heads
    for layer, received in zip(layers, accumulated):
        probs = whole.attentions[layer][0, :, 32:, :].sum(dim=1)  # [Hq, 40]
        torch.testing.assert_close(received, probs.view(kv_heads, -1, 40).mean(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.logits[0, -1], whole.logits[0, -1], rtol=1e-5, atol=1e-5)
    step = torch.tensor([[3]])
    after = sdpa(step, past_key_values=outputs.past_key_values).logits
    torch.testing.assert_close(after, eager(step, past_key_values=whole.past_key_values).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_costs_on_cuda_match_the_cpu(request):
    # `prefixkv calibrate --device cuda`: the same measurement, on the GPU.
    pytest.importorskip("transformers")  # the device machines may lack it
    tiny_llama = request.getfixturevalue("tiny_llama")
    prompt = torch.randint(0, 64, (60,), generator=torch.Generator().manual_seed(5)).tolist()
    args = ((0, 1), WindowScorer(window=8), Protection(sink=1, recent=8), (0.1, 0.5))
    on_cpu = cal.layer_costs(tiny_llama, prompt, *args, positions=6)
    on_cuda = cal.layer_costs(copy.deepcopy(tiny_llama).cuda(), prompt, *args, positions=6)
    assert on_cuda.device.type == "cpu"
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-3, atol=1e-6)


def test_layer_costs_are_zero_when_everything_is_kept(tiny_llama):
    prompt = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    scorer = WindowScorer(window=8)
    costs = cal.layer_costs(tiny_llama, prompt, (0, 1), scorer, Protection(sink=1, recent=8), (0.1, 0.5), positions=5)
    assert costs.shape == (2, 2) and (costs >= 0).all() and costs[:, 0].sum() > 0
    everything = cal.layer_costs(tiny_llama, prompt, (0, 1), scorer, Protection(sink=1, recent=50), (0.1, 0.5), positions=5)
    assert everything.abs().max() < 1e-6


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from prefixkv_vllm.tools.demo_model import demo_model_path

    return AutoTokenizer.from_pretrained(str(demo_model_path()))  # built on first use, as the serving tests do


def test_prompts_cycle_tasks_and_hide_a_needle(tokenizer):
    prompts = cal.calibration_prompts(tokenizer, 6, 512, ["documents", "needles", "chat"])
    assert len(prompts) == 6 and all(0 < len(p) <= 512 for p in prompts)
    assert prompts[0] == cal.calibration_prompts(tokenizer, 1, 512)[0]  # documents alone: as before the mix existed
    needle = tokenizer.decode(prompts[1])
    assert "The code of the blue locker is" in needle and "What is the code of the blue locker?" in needle
    assert tokenizer.decode(prompts[2]).count("What does `") >= 2
    with pytest.raises(ValueError, match="calibration tasks"):
        cal.calibration_prompts(tokenizer, 1, 512, ["poetry"])


def profile():
    return Profile(
        ModelIdentity("m", 3, 1, 4, layers=(0, 2, 4)),
        "window",
        {0.2: (0.05, 0.15, 0.4), 0.5: (0.3, 0.5, 0.7)},
        {"criterion": "loss", "tasks": ["documents"]},
        LayerCosts((0.1, 0.5), ((0.5, 0.1), (0.2, 0.0), (0.9, 0.3))),
    )


def test_table_has_a_row_per_layer_and_a_column_per_budget():
    lines = cli.ratio_table(profile()).splitlines()
    assert lines[0].split() == ["layer", "loss", "@0.2", "loss", "@0.5", "KL", "@0.1", "KL", "@0.5"]
    assert lines[2].split() == ["2", "0.150", "0.500", "0.2000", "0.0000"]
    assert lines[-1].split() == ["mean", "0.200", "0.500"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ratios.png"
    cli.plot_ratios([profile()], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logged_progress_says_how_far(caplog):
    progress = cal.logged_progress(logging.getLogger("vllm.prefixkv.test"), "m")
    with caplog.at_level(logging.INFO, logger="vllm.prefixkv.test"):
        assert list(progress(iter("abc"), "calibration prompts", 3)) == ["a", "b", "c"]
    assert [r.getMessage() for r in caplog.records] == [f"PrefixKV: calibrating m: calibration prompts {i}/3" for i in (1, 2, 3)]


def test_loss_criterion_rejects_budgets_below_its_ratios():
    with pytest.raises(ValueError, match="below"):
        cal.calibrate("/nonexistent", [0.01], criterion="loss")


def test_layer_costs_on_a_hybrid_model_past_its_sliding_window():
    model = tiny_gemma3()
    prompt = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    scorer = WindowScorer(window=8)
    costs = cal.layer_costs(model, prompt, (2,), scorer, Protection(sink=1, recent=4), (0.1, 0.5), positions=5)
    assert costs.shape == (1, 2) and costs[0, 0] > 0
    everything = cal.layer_costs(model, prompt, (2,), scorer, Protection(sink=1, recent=40), (0.1,), positions=5)
    assert everything.abs().max() < 1e-6


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A 2-layer random Llama with the demo model's tokenizer, saved as a checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_writes_the_profile_table_and_plot(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    attention = tmp_path / "attention.json"
    argv = [str(tiny_checkpoint), "--criterion", "attention", "--budget", "0.2", "--prompts", "1", "--max-tokens", "128", "-o", str(attention)]
    assert cli.main(argv) == 0
    output, plot = tmp_path / "loss.json", tmp_path / "loss.png"
    argv = [str(tiny_checkpoint), "--criterion", "loss", "--mix", "needles", "chat", "--budget", "0.2", "0.5", "--prompts", "2",
            "--max-tokens", "128", "--recent", "8", "--positions", "4", "-o", str(output), "--plot", str(plot), "--compare", str(attention)]  # fmt: skip
    assert cli.main(argv) == 0
    profile = Profile.load(output)
    assert profile.provenance["criterion"] == "loss" and profile.provenance["tasks"] == ["needles", "chat"]
    assert len(profile.costs.kl_per_layer) == 2 and profile.costs.ratios == cal.LOSS_RATIOS and sorted(profile.entries) == [0.2, 0.5]
    assert "kl_per_layer" not in profile.provenance and "loss_ratios" not in profile.provenance
    assert Profile.load(attention).provenance["criterion"] == "attention" and Profile.load(attention).costs is None
    table = capsys.readouterr().out
    assert "loss @0.2" in table and "KL @0.05" in table and table.count("\n") >= 4
    # Without flags it calibrates as a server without --kv-profile would: loss, every task, snapkv.
    default = tmp_path / "default.json"
    assert cli.main([str(tiny_checkpoint), "--prompts", "1", "--max-tokens", "128", "--positions", "2", "-o", str(default)]) == 0
    provenance = Profile.load(default).provenance
    assert (provenance["criterion"], provenance["tasks"], Profile.load(default).scorer) == ("loss", list(cal.TASKS), "snapkv")
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_a_loss_profile_serves_any_budget_from_its_costs():
    loss = profile()
    assert loss.keep_ratios(0.2) == (0.05, 0.15, 0.4)  # measured entries stay
    expected = allocate_by_cost([0.1, 0.5], torch.tensor(loss.costs.kl_per_layer), 0.3)
    assert loss.keep_ratios(0.3) == expected and abs(sum(expected) / 3 - 0.3) < 1e-9
    with pytest.raises(ProfileError, match="cannot allocate budget 0.05: budget 0.05 is outside"):
        loss.keep_ratios(0.05)
    attention = Profile(loss.model, "window", {0.2: (0.1, 0.2, 0.3)}, {"criterion": "attention"})
    assert attention.ratio_curves() is None
    with pytest.raises(ProfileError, match=r"no entry for budget 0.3 \(it has: 0.2\)"):
        attention.keep_ratios(0.3)


def test_start_up_calibrates_a_loss_profile_once_for_every_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXKV_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_calibrate(model_path, budgets, **settings):
        calls.append((budgets, settings["criterion"], settings["scorer"]))
        costs = [[scale * (1 - r) ** 2 for r in cal.LOSS_RATIOS] for scale in (0.5, 0.1, 0.9)]
        entries = {b: allocate_by_cost(cal.LOSS_RATIOS, torch.tensor(costs), b) for b in budgets}
        return Profile(ModelIdentity("m", 3, 1, 4), settings["scorer"], entries, {"criterion": settings["criterion"]}, LayerCosts(cal.LOSS_RATIOS, costs))

    monkeypatch.setattr(cal, "calibrate", fake_calibrate)
    first = cal.cached_calibration(str(tmp_path / "m"), 0.2)
    second = cal.cached_calibration(str(tmp_path / "m"), 0.5)
    assert calls == [([0.2], "loss", "snapkv")]  # the second budget came from the cached costs
    assert abs(sum(first.keep_ratios(0.2)) / 3 - 0.2) < 1e-9 and abs(sum(second.keep_ratios(0.5)) / 3 - 0.5) < 1e-9
    with pytest.raises(ValueError, match="below"):
        cal.cached_calibration(str(tmp_path / "m"), 0.02)
    attention = dataclasses.replace(cal.SERVING, criterion="attention")
    monkeypatch.setattr(cal, "calibrate", lambda model_path, budgets, **settings: calls.append(budgets) or first)
    cal.cached_calibration(str(tmp_path / "m"), 0.2, attention)
    cal.cached_calibration(str(tmp_path / "m"), 0.5, attention)
    assert calls[1:] == [[0.2], [0.5]]  # attention ratios depend on the budget: one calibration each


def test_the_committed_default_profile_is_what_start_up_calibrates():
    # The server tests serve the demo model with this profile in place of start-up
    # calibration; if the recipe or a default changes, recalibrate it (`prefixkv calibrate
    # "$(prefixkv demo-model)" --budget 0.2 0.5 -o <this file>`).
    default = Profile.load(DEFAULT_PROFILE)
    provenance = default.provenance
    recipe = (provenance["recipe"], provenance["criterion"], default.scorer, provenance["window"], provenance["tasks"], provenance["samples"])
    defaults = {name: p.default for name, p in inspect.signature(cal.calibrate).parameters.items()}
    assert recipe == (cal.RECIPE_VERSION, cal.SERVING.criterion, cal.SERVING.scorer, cal.SERVING.window, list(cal.TASKS), defaults["num_prompts"])
    loss = (provenance["sink"], provenance["recent"], default.costs.ratios, provenance["positions"])
    assert loss == (cal.SERVING.sink, cal.SERVING.recent, cal.LOSS_RATIOS, cal.LOSS_POSITIONS)
    assert max(provenance["prompt_tokens"]) <= defaults["max_tokens"]
