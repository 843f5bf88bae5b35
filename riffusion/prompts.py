"""Prompt weighting syntax and CLIP text embeddings over up to three windows.

The weighting syntax (``(word:1.3)``, ``(word)``, ``[word]``) is parsed in
:mod:`riffusion.prompt_syntax`, which needs no torch.

Long prompts: tokens are split into 75-token chunks, each wrapped as
``<start> chunk <end> <pad>...`` into one 77-token CLIP window and encoded on its
own; the windows are concatenated along the sequence axis (the UNet's
cross-attention takes any sequence length). More than ``max_windows`` windows is an
error: nothing is ever truncated silently.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from riffusion.prompt_syntax import (
    CLIP_WINDOW_TOKENS,
    DEFAULT_MAX_WINDOWS,
    EMPHASIS,
    MAX_PROMPT_TOKENS,
    check_prompt_length,
    min_clip_tokens,
    parse_prompt_weights,
)

__all__ = [
    "CLIP_WINDOW_TOKENS",
    "DEFAULT_MAX_WINDOWS",
    "EMPHASIS",
    "MAX_PROMPT_TOKENS",
    "PromptEncoder",
    "PromptTooLongError",
    "check_prompt_length",
    "min_clip_tokens",
    "parse_prompt_weights",
]


class PromptTooLongError(ValueError):
    """A prompt needing more CLIP tokens than the encoder's windows hold (nothing is truncated)."""

    def __init__(self, message: str, token_count: int, max_tokens: int) -> None:
        super().__init__(message)
        self.token_count = token_count
        self.max_tokens = max_tokens


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    size: int
    max_size: int


class PromptEncoder:
    """Weighted, multi-window CLIP text embeddings with a bounded LRU cache.

    Weighting: each token's output embedding is multiplied by its weight, then the
    whole window is rescaled so its mean token norm (L2 over the hidden size,
    averaged over the 77 positions) is what it was unweighted. We preserve the mean
    *norm* rather than the signed mean because CLIP's final layer norm centres the
    hidden states, so their signed mean is close to zero and dividing by it is
    unstable. All weights 1.0 gives exactly the plain embedding.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        max_windows: int = DEFAULT_MAX_WINDOWS,
        cache_size: int = 256,
    ) -> None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        if cache_size < 0:
            raise ValueError(f"cache_size must not be negative, got {cache_size}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_windows = max_windows
        self.cache_size = cache_size
        self.window_length: int = tokenizer.model_max_length
        self.chunk_length = self.window_length - 2  # room for <start> and <end>
        self._cache: OrderedDict[tuple[str, int], Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        # windows_needed() runs for every prompt of every batch: tokenise each once.
        self._tokenize_cached = functools.lru_cache(maxsize=cache_size)(self._tokenize)

    @property
    def max_tokens(self) -> int:
        return self.max_windows * self.chunk_length

    def tokenize(self, prompt: str) -> tuple[list[int], list[float]]:
        """Token ids (no special tokens) and one weight per token."""
        token_ids, weights = self._tokenize_cached(prompt)
        return list(token_ids), list(weights)

    def _tokenize(self, prompt: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        token_ids: list[int] = []
        weights: list[float] = []
        for fragment, weight in parse_prompt_weights(prompt):
            # verbose=False: fragments longer than one window are expected here.
            ids = self.tokenizer(fragment, add_special_tokens=False, verbose=False).input_ids
            token_ids += ids
            weights += [weight] * len(ids)
        return tuple(token_ids), tuple(weights)

    def windows_needed(self, prompt: str) -> int:
        """CLIP windows ``prompt`` needs; raises PromptTooLongError past ``max_windows``."""
        token_count = len(self.tokenize(prompt)[0])
        return self._windows_for(token_count, prompt)

    def _windows_for(self, token_count: int, prompt: str) -> int:
        windows = max(1, math.ceil(token_count / self.chunk_length))
        if windows > self.max_windows:
            preview = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise PromptTooLongError(
                f"prompt is {token_count} tokens long, more than the {self.max_tokens} tokens "
                f"({self.max_windows} CLIP windows of {self.chunk_length}) supported; "
                f"shorten it: {preview!r}",
                token_count,
                self.max_tokens,
            )
        return windows

    def encode(self, prompt: str, num_windows: int | None = None) -> Tensor:
        """Embedding ``(1, 77 * windows, D)``; padded with empty windows up to ``num_windows``
        so prompts of different lengths can be interpolated and batched. The returned
        tensor is shared with the cache: do not modify it in place."""
        key = (prompt, num_windows if num_windows is not None else 0)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return cached
            self._misses += 1
        embedding = self._encode_uncached(prompt, num_windows)
        with self._lock:
            self._cache[key] = embedding
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self.cache_size)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def _encode_uncached(self, prompt: str, num_windows: int | None) -> Tensor:
        token_ids, weights = self.tokenize(prompt)
        windows = self._windows_for(len(token_ids), prompt)
        if num_windows is not None:
            if num_windows > self.max_windows:
                raise ValueError(
                    f"num_windows={num_windows} exceeds max_windows={self.max_windows}"
                )
            if num_windows < windows:
                raise ValueError(
                    f"prompt needs {windows} CLIP windows but num_windows={num_windows}; "
                    "it would be truncated"
                )
            windows = num_windows
        input_ids = torch.full(
            (windows, self.window_length), self.tokenizer.pad_token_id, dtype=torch.long
        )
        token_weights = torch.ones(windows, self.window_length)
        for window in range(windows):
            start = window * self.chunk_length
            chunk = token_ids[start : start + self.chunk_length]
            # <start> chunk <end> <pad>...; a window past the prompt's end is the empty prompt.
            input_ids[window, 0] = self.tokenizer.bos_token_id
            input_ids[window, 1 : 1 + len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            input_ids[window, 1 + len(chunk)] = self.tokenizer.eos_token_id
            token_weights[window, 1 : 1 + len(chunk)] = torch.tensor(
                weights[start : start + len(chunk)]
            )
        device = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            # (windows, 77, D): each window is encoded on its own, as CLIP was trained.
            hidden = self.text_encoder(input_ids.to(device))[0]
        weighted = _apply_weights(hidden.float(), token_weights.to(device))
        return weighted.to(hidden.dtype).reshape(1, windows * self.window_length, -1)


def _apply_weights(hidden: Tensor, token_weights: Tensor) -> Tensor:
    """Scale tokens by their weights, keeping each window's mean token norm."""
    if bool((token_weights == 1).all()):
        return hidden
    norm_before = hidden.norm(dim=-1).mean(dim=-1, keepdim=True)  # (windows, 1)
    weighted = hidden * token_weights.unsqueeze(-1)
    norm_after = weighted.norm(dim=-1).mean(dim=-1, keepdim=True).clamp_min(1e-12)
    return weighted * (norm_before / norm_after).unsqueeze(-1)
