"""Prompt length limits: the API's tokenizer-free bound and the model's own tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from riffusion.prompts import MAX_PROMPT_TOKENS, check_prompt_length, min_clip_tokens


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from riffusion.models import _tiny_tokenizer

    return _tiny_tokenizer()


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
@example(text="<|startoftext|>")  # one special token, not three pieces of punctuation
@example(text="a<|endoftext|>b's")
def test_min_clip_tokens_is_a_lower_bound(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    from riffusion.prompts import parse_prompt_weights

    real = sum(
        len(tokenizer(fragment, add_special_tokens=False, verbose=False).input_ids)
        for fragment, _ in parse_prompt_weights(text)
    )
    assert min_clip_tokens(text) <= real


def test_check_prompt_length_refuses_only_sure_overflows() -> None:
    assert check_prompt_length("church bells " * 50) == "church bells " * 50  # 100 pieces
    with pytest.raises(ValueError, match=r"at least 500 CLIP tokens.*225"):
        check_prompt_length("a " * 499 + "a")
    assert MAX_PROMPT_TOKENS == 225


def test_model_service_names_the_prompt_its_tokenizer_cannot_fit(tokenizer) -> None:  # type: ignore[no-untyped-def]
    import torch

    from riffusion.api_schemas import error_reply
    from riffusion.contracts import JobFieldError
    from riffusion.prompts import PromptEncoder
    from riffusion.schemas import GenerationJob, PromptInput
    from serving.model_calls import check_prompt_tokens

    encoder = PromptEncoder(tokenizer, torch.nn.Identity())
    over = ("word " * 200).strip()  # 200 pieces: passes the API's bound; 800 real tokens
    assert check_prompt_length(over) == over
    fine = PromptInput(prompt="word " * 50, negative_prompt="noise", seed=1)  # 200 tokens
    check_prompt_tokens(encoder, GenerationJob(start=fine, end=fine))

    job = GenerationJob(start=fine, end=fine.model_copy(update={"negative_prompt": over}))
    with pytest.raises(JobFieldError) as raised:
        check_prompt_tokens(encoder, job)
    assert raised.value.field == "end.negative_prompt"
    reply = error_reply(raised.value)
    assert reply.error is not None and reply.error.status == 400
    assert reply.error.field == "end.negative_prompt"
    assert reply.error.message == "800 CLIP tokens long, more than the 225 supported; shorten it"
