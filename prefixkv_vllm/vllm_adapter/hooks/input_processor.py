"""The input processor: request validation (a bad ``kv_budget`` gets HTTP 400) and input sessions."""

from __future__ import annotations

from ...config import PrefixKVConfig


def install() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from . import bind_when_active

    bind_when_active(InputProcessor, bind_input_processor)


def bind_input_processor(processor, config: PrefixKVConfig) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from ..request_options import budget_of

    original_validate = processor._validate_params
    original_process = processor.process_inputs

    def _validate_params(params, *args, **kwargs):
        result = original_validate(params, *args, **kwargs)
        if isinstance(params, SamplingParams):
            try:
                budget_of(params)
            except ValueError as exc:  # vLLM answers VLLMValidationError with HTTP 400
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return result

    def process_inputs(*args, resumable: bool = False, **kwargs):
        if resumable:
            # A session's next input extends the prompt, whose blocks may already be compacted.
            raise VLLMValidationError("PrefixKV does not support streaming-input sessions (--kv-policy is set)")
        return original_process(*args, **kwargs)

    processor._validate_params = _validate_params
    processor.process_inputs = process_inputs
