"""Prompt weighting syntax and a tokenizer-free bound on a prompt's CLIP tokens (no torch).

Syntax (parsed by :func:`parse_prompt_weights`):

- ``(text:1.3)`` multiplies the weight of ``text`` by 1.3 (unsigned decimal numbers);
- ``(text)`` multiplies it by 1.1, ``[text]`` divides it by 1.1;
- nesting multiplies: ``((text))`` is 1.21, ``([text])`` is 1.0;
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters;
- unbalanced brackets never fail: a stray ``)`` or ``]`` is kept as text, and a
  ``(`` or ``[`` left open weights everything after it, as if closed at the end.

The API service validates prompts with :func:`check_prompt_length` without loading
torch; :mod:`riffusion.prompts` embeds them.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

EMPHASIS = 1.1
# CLIP's window: 77 tokens, of which <start> and <end> take two.
CLIP_WINDOW_TOKENS = 77
DEFAULT_MAX_WINDOWS = 3
MAX_PROMPT_TOKENS = DEFAULT_MAX_WINDOWS * (CLIP_WINDOW_TOKENS - 2)

# CLIP's pre-tokenizer splits text into these pieces before BPE, and BPE gives every
# piece at least one token: special tokens (one each), contractions, letter runs,
# single digits, other runs.
# (Python's letter class also takes numerals such as '²' that CLIP splits off: that
# only merges pieces, so the count stays a lower bound.)
_CLIP_PIECE_RE = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\w\s]|_)+",
    re.IGNORECASE,
)

_TOKEN_RE = re.compile(
    r"""
    (?P<escaped>\\[\\()\[\]])                                  # \( \) \[ \] \\
    | :\s*(?P<weight>\d+(?:\.\d*)?|\.\d+)\s*\)                 # :1.3) closes a group
    | (?P<bracket>[()\[\]])
    | (?P<text>[^\\()\[\]:]+|[\\:])                            # plain text, lone \ or :
    """,
    re.VERBOSE,
)


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` pairs; neighbours with equal weights merge."""
    segments: list[list[Any]] = []  # [text, weight], mutable so groups can rescale them
    open_round: list[int] = []  # index of the first segment inside each open "("
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for match in _TOKEN_RE.finditer(text):
        token = match.group(0)
        if match.group("escaped"):
            segments.append([token[1], 1.0])
        elif match.group("weight") is not None:
            if open_round:
                scale_from(open_round.pop(), float(match.group("weight")))
            else:  # no group to close: keep it as written
                segments.append([token, 1.0])
        elif token == "(":
            open_round.append(len(segments))
        elif token == "[":
            open_square.append(len(segments))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), 1 / EMPHASIS)
        else:  # text, or a closing bracket with nothing to close
            segments.append([token, 1.0])
    # Groups left open run to the end of the prompt.
    for start in open_round:
        scale_from(start, EMPHASIS)
    for start in open_square:
        scale_from(start, 1 / EMPHASIS)

    merged: list[tuple[str, float]] = []
    for fragment, weight in segments:
        if merged and math.isclose(merged[-1][1], weight):
            merged[-1] = (merged[-1][0] + fragment, merged[-1][1])
        else:
            merged.append((fragment, weight))
    return [(fragment, weight) for fragment, weight in merged if fragment]


def min_clip_tokens(prompt: str) -> int:
    """A lower bound on the CLIP tokens ``prompt`` needs, without the tokenizer.

    Counts the pre-tokenizer's pieces of each weighted fragment (as
    :class:`PromptEncoder` tokenises them), after CLIP's HTML unescaping. A prompt
    whose bound exceeds :data:`MAX_PROMPT_TOKENS` can be refused before it reaches
    the model; one under it may still be too long (a long word is many tokens).
    """
    return sum(
        len(_CLIP_PIECE_RE.findall(html.unescape(html.unescape(fragment)).lower()))
        for fragment, _ in parse_prompt_weights(prompt)
    )


def check_prompt_length(prompt: str) -> str:
    """``prompt`` itself, or ValueError when it surely needs more than 3 CLIP windows."""
    tokens = min_clip_tokens(prompt)
    if tokens > MAX_PROMPT_TOKENS:
        raise ValueError(
            f"at least {tokens} CLIP tokens long, more than the {MAX_PROMPT_TOKENS} supported "
            f"({DEFAULT_MAX_WINDOWS} windows of {CLIP_WINDOW_TOKENS - 2}); shorten it"
        )
    return prompt
