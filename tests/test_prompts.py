"""Prompt weighting syntax and multi-window text embeddings on the tiny model."""

from __future__ import annotations

import pytest
import torch

from riffusion.models import RiffusionComponents, build_tiny_components
from riffusion.prompts import EMPHASIS, PromptEncoder, parse_prompt_weights


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("church bells on sunday", [("church bells on sunday", 1.0)]),
        ("(loud:1.3) drums", [("loud", 1.3), (" drums", 1.0)]),
        ("( loud : 0.5 ) drums", [(" loud ", 0.5), (" drums", 1.0)]),
        ("(loud) drums", [("loud", EMPHASIS), (" drums", 1.0)]),
        ("[soft] piano", [("soft", 1 / EMPHASIS), (" piano", 1.0)]),
        ("((deep)) bass", [("deep", EMPHASIS**2), (" bass", 1.0)]),
        ("([even])", [("even", 1.0)]),
        ("(a (b:2) c:0.5) d", [("a ", 0.5), ("b", 1.0), (" c", 0.5), (" d", 1.0)]),
        (r"smile \(happy\) \[x\] a\\b", [(r"smile (happy) [x] a\b", 1.0)]),
        ("time: 3:45, ratio (a:b)", [("time: 3:45, ratio ", 1.0), ("a:b", EMPHASIS)]),
        ("", []),
    ],
    ids=[
        "plain",
        "weighted",
        "weighted-spaces",
        "paren",
        "bracket",
        "nested",
        "cancel",
        "nested-weights",
        "escaped",
        "colons",
        "empty",
    ],
)
def test_parse_prompt_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_weights(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a ) b ] c", [("a ) b ] c", 1.0)]),
        ("calm (open rest", [("calm ", 1.0), ("open rest", EMPHASIS)]),
        ("[x", [("x", 1 / EMPHASIS)]),
        ("stray:2) text", [("stray:2) text", 1.0)]),
        ("(a [b) c]", [("a ", EMPHASIS), ("b", 1.0), (" c", 1 / EMPHASIS)]),
    ],
    ids=["stray-closers", "open-paren", "open-bracket", "stray-weight", "interleaved"],
)
def test_unbalanced_brackets_are_handled(prompt: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_weights(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


@pytest.fixture(scope="module")
def tiny() -> RiffusionComponents:
    return build_tiny_components(seed=0, device="cpu")


@pytest.fixture
def encoder(tiny: RiffusionComponents) -> PromptEncoder:
    return PromptEncoder(tiny.tokenizer, tiny.text_encoder, max_windows=3, cache_size=4)


def _reference(tiny: RiffusionComponents, prompt: str) -> torch.Tensor:
    """The standard single-window embedding: pad to 77 tokens, run CLIP once."""
    ids = tiny.tokenizer(
        prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return tiny.text_encoder(ids)[0]


def test_plain_prompt_is_the_standard_clip_embedding(
    tiny: RiffusionComponents, encoder: PromptEncoder
) -> None:
    embedding = encoder.encode("church bells on sunday")
    assert embedding.shape == (1, 77, 32)
    assert torch.equal(embedding, _reference(tiny, "church bells on sunday"))
    # Weight 1.0 is exactly the plain prompt.
    assert torch.equal(encoder.encode("(church:1.0) bells on sunday"), embedding)


def test_empty_prompt_is_the_empty_string_embedding(
    tiny: RiffusionComponents, encoder: PromptEncoder
) -> None:
    assert torch.equal(encoder.encode(""), _reference(tiny, ""))


@pytest.mark.parametrize("weight", [1.5, 0.5])
def test_weight_scales_the_token_against_the_rest(
    tiny: RiffusionComponents, encoder: PromptEncoder, weight: float
) -> None:
    plain = encoder.encode("jazz piano")[0]
    weighted = encoder.encode(f"({'jazz'}:{weight}) piano")[0]
    jazz_positions = range(1, 1 + len(tiny.tokenizer("jazz", add_special_tokens=False).input_ids))
    other_positions = [p for p in range(77) if p not in jazz_positions]

    def jazz_share(embedding: torch.Tensor) -> torch.Tensor:
        norms = embedding.norm(dim=-1)
        return (norms[list(jazz_positions)].mean() / norms[other_positions].mean()).item()

    # The weighted tokens grow (or shrink) by exactly `weight` relative to the others...
    assert jazz_share(weighted) / jazz_share(plain) == pytest.approx(weight, rel=1e-5)
    # ...while the window's mean token norm is preserved.
    assert weighted.norm(dim=-1).mean().item() == pytest.approx(
        plain.norm(dim=-1).mean().item(), rel=1e-5
    )
    # Directions do not change: every token is only rescaled.
    cosine = torch.nn.functional.cosine_similarity(weighted, plain, dim=-1)
    assert torch.allclose(cosine, torch.ones(77), atol=1e-5)


def test_emphasis_syntax_matches_explicit_weight(encoder: PromptEncoder) -> None:
    torch.testing.assert_close(encoder.encode("(jazz) piano"), encoder.encode("(jazz:1.1) piano"))
    torch.testing.assert_close(
        encoder.encode("[jazz] piano"), encoder.encode(f"(jazz:{1 / 1.1}) piano")
    )


def test_long_prompt_uses_two_windows_and_is_not_truncated(
    tiny: RiffusionComponents, encoder: PromptEncoder
) -> None:
    prompt = " ".join(["bells", "drums"] * 12)  # > 75 byte-level tokens in the tiny vocab
    token_count = len(encoder.tokenize(prompt)[0])
    assert 75 < token_count <= 150
    assert encoder.windows_needed(prompt) == 2
    embedding = encoder.encode(prompt)
    assert embedding.shape == (1, 154, 32)
    # The first window is exactly what a plain 77-token pipeline would use (the
    # truncation); the second carries the tail instead of the empty-prompt padding
    # that the truncated prompt would get.
    torch.testing.assert_close(embedding[:, :77], _reference(tiny, prompt), rtol=0, atol=1e-6)
    truncation_padded = torch.cat([_reference(tiny, prompt), _reference(tiny, "")], dim=1)
    assert not torch.allclose(embedding, truncation_padded, atol=1e-4)


def test_padding_to_more_windows_appends_empty_windows(
    tiny: RiffusionComponents, encoder: PromptEncoder
) -> None:
    padded = encoder.encode("church bells", num_windows=3)
    assert padded.shape == (1, 231, 32)
    assert torch.equal(padded[:, :77], encoder.encode("church bells"))
    empty = _reference(tiny, "")
    assert torch.equal(padded[:, 77:154], empty) and torch.equal(padded[:, 154:], empty)
    # Two prompts padded to the same window count can be interpolated.
    other = encoder.encode("jazz", num_windows=3)
    assert torch.lerp(padded, other, 0.5).shape == (1, 231, 32)


def test_too_long_prompt_raises(encoder: PromptEncoder) -> None:
    prompt = "bells " * 60  # about 360 tokens: more than 3 windows of 75
    with pytest.raises(ValueError, match=r"more than the 225 tokens \(3 CLIP windows"):
        encoder.encode(prompt)
    with pytest.raises(ValueError, match="would be truncated"):
        encoder.encode(" ".join(["bells", "drums"] * 12), num_windows=1)


def test_repeated_prompt_hits_the_cache(
    encoder: PromptEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = encoder.encode("church bells")
    assert encoder.cache_info().misses == 1 and encoder.cache_info().hits == 0
    calls = 0
    real_forward = encoder.text_encoder.forward

    def counting_forward(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(encoder.text_encoder, "forward", counting_forward)
    again = encoder.encode("church bells")
    assert again is first and calls == 0
    assert encoder.cache_info().hits == 1
    encoder.encode("church bells", num_windows=2)  # another key: encoded
    assert calls == 1


def test_cache_is_bounded_lru(encoder: PromptEncoder) -> None:
    for prompt in ["a", "b", "c", "d"]:
        encoder.encode(prompt)
    encoder.encode("a")  # refresh "a": "b" is now the least recently used
    encoder.encode("e")
    assert encoder.cache_info().size == 4
    misses = encoder.cache_info().misses
    encoder.encode("a")
    assert encoder.cache_info().misses == misses
    encoder.encode("b")
    assert encoder.cache_info().misses == misses + 1
