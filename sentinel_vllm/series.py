"""Names of entropy series: the one grammar, parsed and formatted here.

A response's per-step entropy comes in *series* (docs/method.md, "Entropy series"):

* ``full``: full-vocabulary entropy;
* ``top{K}``: the paper's top-K entropy (full-softmax probabilities of the K
  largest logits, not renormalised);
* ``top{K}_renorm``: the same K probabilities renormalised to sum to 1;
* ``topk`` / ``topk_renorm``: the same with the K a trace record or a sentinel
  names beside it.

Every module that reads or writes a series name goes through this one:
traces (record keys), the sentinel file (its ``entropy``/``k`` metadata), the
device state (:func:`sentinel_vllm.kernels.parse_series`), serving (which series
the worker must record for a sentinel) and collection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "SERIES_RE",
    "is_series",
    "parse_series_name",
    "canonical",
    "series_name",
    "series_names",
    "split_series",
]

#: Every valid series name.
SERIES_RE = re.compile(r"^(full|topk|topk_renorm|top(\d+)(_renorm)?)$")


def is_series(name: str) -> bool:
    """True for a valid series name (see the module docstring)."""
    return isinstance(name, str) and SERIES_RE.match(name) is not None


def parse_series_name(entropy: str, k: int | None = None) -> tuple[str, int | None]:
    """Kind and k of a series name: ``"top5"`` -> ``("topk", 5)``, ``"top5_renorm"`` -> ``("topk_renorm", 5)``.

    Parameters
    ----------
    entropy : str
        A series name.
    k : int, optional
        The k of a bare ``"topk"``/``"topk_renorm"`` (returned as is; may be None).

    Returns
    -------
    kind : {"full", "topk", "topk_renorm"}
    k : int or None
        None for ``"full"``.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    m = SERIES_RE.match(entropy or "")
    if not m:
        raise ValueError(
            f"unknown entropy kind {entropy!r}: use full, topk, topk_renorm, top<K> or top<K>_renorm"
        )
    if m.group(2):
        return ("topk_renorm" if m.group(3) else "topk"), int(m.group(2))
    return entropy, (None if entropy == "full" else k)


def canonical(entropy: str, k: int | None = None) -> tuple[str, int | None]:
    """Canonical ``(kind, k)``: ``("full", None)``, ``("topk", k)`` or ``("topk_renorm", k)``.

    Unlike :func:`parse_series_name`, a top-k kind must end up with a k:
    ``"top20"`` equals ``("topk", 20)``; ``"topk"`` needs ``k``.

    Raises
    ------
    ValueError
        Unknown name, a top-k kind without k, or a name whose k contradicts ``k``.
    """
    kind, kk = parse_series_name(entropy, k)
    if kind == "full":
        return "full", None
    if kk is None:
        raise ValueError(f"entropy {entropy!r} needs k (the top-k size)")
    if k is not None and int(k) != int(kk):
        raise ValueError(f"entropy {entropy!r} says k={kk} but k={k} was given")
    return kind, int(kk)


def series_name(entropy: str, k: int | None = None) -> str:
    """The explicit name of a series: ``"full"``, ``"top{k}"`` or ``"top{k}_renorm"``.

    Parameters
    ----------
    entropy : str
        Any series name or kind (``"topk"`` needs ``k``).
    k : int, optional

    Raises
    ------
    ValueError
        As :func:`canonical`.

    Examples
    --------
    >>> series_name("topk", 20), series_name("top5_renorm"), series_name("full", 7)
    ('top20', 'top5_renorm', 'full')
    """
    kind, kk = canonical(entropy, k)
    if kind == "full":
        return "full"
    return f"top{kk}" + ("_renorm" if kind == "topk_renorm" else "")


def series_names(ks: Iterable[int], *, full: bool = True, renorm: bool = False) -> list[str]:
    """``["full", "top{k}"..., "top{k}_renorm"...]`` for the given ks (in their order).

    Examples
    --------
    >>> series_names([5, 20], renorm=True)
    ['full', 'top5', 'top20', 'top5_renorm', 'top20_renorm']
    """
    ks = list(ks)
    out = ["full"] if full else []
    out += [series_name("topk", k) for k in ks]
    if renorm:
        out += [series_name("topk_renorm", k) for k in ks]
    return out


def split_series(value: str | Sequence[str]) -> tuple[str, ...]:
    """A comma list (``"full,top20"``) or a sequence of names, stripped, empties dropped.

    Names are not validated here (the device state does, with its own limits on k).
    """
    items = value.split(",") if isinstance(value, str) else value
    return tuple(s.strip() for s in items if s and s.strip())
