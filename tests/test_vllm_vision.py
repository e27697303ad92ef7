"""End to end with images: a vision-language model through `vllm serve` and the plugin, on CPU.

The model is ``prefixkv demo-vlm --text tiny``: Idefics3 with random weights and a
2-layer language model (fast), 64 ``<image>`` prompt tokens per image, images sent
as base64 PNG ``image_url`` parts and processed without torchvision.
"""

from __future__ import annotations

import base64
import io

import pytest

pytest.importorskip("vllm")

from PIL import Image  # noqa: E402

from prefixkv_vllm.tools.demo_vlm import IMAGE_TOKENS, demo_vlm_path  # noqa: E402

from .vllm_server import concurrent_streams, document, serve_together  # noqa: E402

VLM_ARGS = ("--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 2}')
RED, BLUE = (220, 30, 30), (30, 40, 220)


def image_part(color) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), color).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def image_message(colors, text: str) -> list[dict]:
    return [*(image_part(c) for c in colors), {"type": "text", "text": text}]


IMAGE_PROMPTS = [
    image_message([RED], "What colour is this picture?"),
    image_message([BLUE], document(30) + "\nDescribe the picture, then count the red boxes."),
    image_message([RED, BLUE], "Compare the two pictures.\n" + document(50, offset=3)),
]


@pytest.fixture(scope="module")
def model() -> str:  # in place of conftest's demo model
    return str(demo_vlm_path("tiny"))


@pytest.fixture(scope="module")
def servers(model, log_dir):
    configs = {
        "stock": (VLM_ARGS, {"VLLM_PLUGINS": ""}),
        "budget_one": ((*VLM_ARGS, "--kv-policy", "prefixkv", "--kv-budget", "1.0"), None),
        # prefixkv without a profile: start-up calibrates the vision-language model (text prompts).
        "compressed": ((*VLM_ARGS, "--kv-policy", "prefixkv", "--kv-budget", "0.2"), None),
    }
    with serve_together(model, configs, log_dir=log_dir) as started:
        yield started


@pytest.fixture(scope="module")
def stock(servers):
    return servers["stock"]


@pytest.fixture(scope="module")
def budget_one(servers):
    return servers["budget_one"]


@pytest.fixture(scope="module")
def compressed(servers):
    return servers["compressed"]


def greedy_tokens(server, content) -> list[str]:
    choice = server.chat(content, max_tokens=24, logprobs=True)["choices"][0]
    return [t["token"] for t in choice["logprobs"]["content"]]


def first_token_logprobs(server, content) -> dict[str, float]:
    choice = server.chat(content, max_tokens=1, logprobs=True, top_logprobs=5)["choices"][0]
    return {t["token"]: t["logprob"] for t in choice["logprobs"]["content"][0]["top_logprobs"]}


def logprob_distance(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest logprob change over both top-5 lists; a token missing from one list counts as infinitely far."""
    return max(abs(a.get(token, -float("inf")) - b.get(token, -float("inf"))) for token in a.keys() | b.keys())


def test_budget_one_reproduces_stock_on_image_prompts(stock, budget_one):
    for content in IMAGE_PROMPTS:
        usage = stock.chat(content, max_tokens=1)["usage"]
        assert usage["prompt_tokens"] > IMAGE_TOKENS * (len(content) - 1)  # the images are in the prompt
        assert greedy_tokens(budget_one, content) == greedy_tokens(stock, content)


def test_calibrated_ratios_cover_the_language_model(compressed):
    line = next(line for line in compressed.log().splitlines() if "keep ratios per layer" in line)
    ratios = [float(r) for r in line.split("keep ratios per layer: ")[1].split(";")[0].split()]
    assert len(ratios) == 2 and abs(sum(ratios) / 2 - 0.2) < 0.01


def test_images_still_steer_the_answer_under_compression(compressed):
    text = document(40) + "\nWhat colour is the picture?"
    red = first_token_logprobs(compressed, image_message([RED], text))
    # The repeat may reuse the first request's cached prefix blocks, so its float32 sums run
    # in other chunks and may differ in the last bits (seen: 1e-6); a different image must
    # move the distribution by far more than that.
    assert logprob_distance(first_token_logprobs(compressed, image_message([RED], text)), red) < 1e-4
    assert logprob_distance(first_token_logprobs(compressed, image_message([BLUE], text)), red) > 1e-2


def _usage_while_decoding(server) -> float:
    prompts = [image_message([RED, BLUE], document(110, offset=k * 17) + "\nDescribe both pictures.") for k in range(2)]
    samples = []

    def sample(progress):
        if min(progress) >= 6:
            samples.append(server.metric("vllm:kv_cache_usage_perc"))

    concurrent_streams(server, prompts, max_tokens=200, on_progress=sample, ignore_eos=True)
    assert samples, "no /metrics sample was taken while both requests decoded"
    return max(samples)


def test_image_prompts_free_their_blocks(stock, compressed):
    stock_usage = _usage_while_decoding(stock)
    compressed_usage = _usage_while_decoding(compressed)
    assert stock_usage > 0
    assert compressed_usage <= 0.4 * stock_usage, (compressed_usage, stock_usage)
    assert compressed.metric("vllm:kv_cache_usage_perc") == 0.0
