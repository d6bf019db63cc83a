"""Size guards: an operator call that would add more parameters than a limit needs permission.

Identity layers and widenings are cheap on small layers and enormous on wide ones: an identity
linear after VGG's 25,088-wide flatten holds 629 M parameters, and widening VGG's last conv by
512 channels adds 102 M to the classifier behind the flatten. Every operator that adds
parameters takes `max_new_params` (default `MAX_NEW_PARAMS`) and refuses a call over it before
building any tensor; `max_new_params=None` lifts the limit. A search space that offers only
calls the operators accept never proposes such a child by accident.
"""

from __future__ import annotations

from growth.errors import OperatorError

MAX_NEW_PARAMS = 32_000_000  # ~128 MB of float32: above any identity layer of a 4,096-wide fc


def check_size(call: str, added: int, limit: int | None) -> None:
    """OperatorError if `added` parameters exceed `limit` (None: no limit)."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise OperatorError(f"{call}: max_new_params must be a non-negative int or None, got "
                            f"{limit!r}")
    if added > limit:
        raise OperatorError(
            f"{call} would add {added:,} parameters, over the limit of {limit:,}; pass "
            f"max_new_params={added} (or None) to allow it, or pick a smaller change")
