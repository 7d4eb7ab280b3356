"""Image downsampling as a compression baseline (VTC-Bench, Liao et al., arXiv 2510.07143: plain downsampling
beats many pruning methods; METHODS.md §3 "VTC-Bench").

Nothing is pruned: the image reaches the processor at a lower resolution, so the encoder gives about keep*N visual
tokens to begin with. The family's processor decides how a resolution maps to tokens (a `Knob`,
`prunebench.families.resolution`: the long side for Qwen-VL and any-resolution LLaVA, the tile budget for
InternVL); this function only picks the knob's setting. Fixed-resolution LLaVA-1.5 has no knob and is refused.
"""

from __future__ import annotations

from collections.abc import Callable

from prunebench.checks import Kind
from prunebench.methods.base import Positions, Stage, register_method

# PIL filters the image may be resized with (`families/resolution.py` RESAMPLING maps them)
FILTERS = ("bicubic", "bilinear", "lanczos", "nearest")


def largest_setting_at_most(tokens: Callable[[int], int], low: int, high: int, count: int) -> int | None:
    """The largest setting s in [low, high] with tokens(s) <= count (binary search: counts rise with s), or None
    when even `low` gives more. With a count that is not monotone it still returns an s with tokens(s) <= count."""
    if tokens(low) > count:
        return None
    lo, hi = low, high
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tokens(mid) <= count:
            lo = mid
        else:
            hi = mid - 1
    return lo


def choose_setting(tokens: Callable[[int], int], low: int, high: int, n_keep: int) -> int:
    """The setting for a budget of n_keep tokens: of the attainable counts next to n_keep (the largest <= n_keep and
    the smallest above it), the nearer one (a tie: the smaller); then the largest setting giving at most that count
    (the most pixels for those tokens). When no setting reaches n_keep, the smallest count there is."""
    below = largest_setting_at_most(tokens, low, high, n_keep)
    counts = [] if below is None else [tokens(below)]
    above = low if below is None else below + 1
    if above <= high:
        counts.append(tokens(above))
    best = min(counts, key=lambda c: (abs(c - n_keep), c))
    setting = largest_setting_at_most(tokens, low, high, best)
    assert setting is not None  # best is a count some setting gives
    return setting


@register_method(
    "downsample",
    stage=Stage.INPUT,
    source="VTC-Bench (Chenfei-Liao/VTC-Bench, arXiv 2510.07143): image downsampling as the compression "
    "baseline; issue 17 item 6. The token arithmetic is each processor's own (prunebench/families/resolution.py)",
    dtype="no scoring; the image is resampled by PIL on its 8-bit pixels before the processor",
    rounding="n_keep = round(keep*N) (n_keep_for, half up, >= 1) with N the unresized image's tokens; the knob "
    "setting whose count is nearest n_keep (largest <= n_keep vs smallest above; a tie: fewer), then the largest "
    "setting giving that count. Approximate: the count moves in the processor's steps (Qwen: whole 2x2 merge "
    "units on both sides; InternVL: whole tiles; any-res: grid tiles)",
    positions=Positions.CONTIGUOUS,
    defaults={"resample": "bicubic"},
    kinds={"resample": Kind("str", choices=FILTERS)},
    deviations=(
        "the budget is approximate: n_visual_out is the attainable count nearest round(keep*N), not round(keep*N); "
        "the record's n_visual_out is what the resized image gives (counted in the prompt), n_visual_in what the "
        "unresized one would (N)",
        "resolution, not a scale factor: the long side (or InternVL's tile budget) is searched for the count; "
        "VTC-Bench's own resize code was not read [unverified: its filter and rounding]",
        "resampling: PIL Image.resize with `resample` (default bicubic, the Qwen / LLaVA processors' own filter; "
        "PIL antialiases when shrinking); the processor then resizes again as it always does",
        "aspect ratio kept: the short side is scaled with the long side (round half up, at least 1 px)",
        "minimum sizes: Qwen-VL never goes below the image processor's min_pixels (smart_resize would scale it "
        "back up), so its floor is min_pixels / 28^2 tokens; LLaVA-NeXT / OneVision keep the base image (a fixed "
        "grid) and at least one any-res tile, so the floor is base + the smallest grid; InternVL cuts at least "
        "min_patches tiles (one tile, no thumbnail); a budget below the floor gets the floor (flagged "
        "`budget unreachable`)",
        "InternVL: fewer tiles (the processor's max_patches lowered per image; the image itself is not resized), "
        "so the count moves in whole tiles (+ the thumbnail while there are two or more); one setting per "
        "processor call, so batch_size 1 only",
        "images only: video samples are refused; LLaVA-1.5 (fixed 336 px, 576 tokens) is refused: use pooling_pre",
        "the built-in runner only (it prepares the images before its processor call); the VLMEvalKit and "
        "lmms-eval backends build their own inputs and refuse the method",
    ),
)
def downsample(tokens: Callable[[int], int], low: int, high: int, n_keep: int, resample: str) -> int:
    """The knob setting for about n_keep visual tokens (high = the image unchanged when nothing smaller helps)."""
    del resample  # applied with the setting (Knob.apply)
    if tokens(high) <= n_keep:
        return high
    return choose_setting(tokens, low, high, n_keep)
