"""The sentinel file: schema, metadata, loader and runtime scorer.

A sentinel file is one self-contained ONNX graph (written by
:mod:`sentinel_vllm.onnx_graph`): input ``features`` (float64 of shape
(n, n_features)), outputs ``p_correct`` (n,) and ``probabilities`` (n, 2).

Metadata lives in ``ModelProto.metadata_props``: the whole dict as JSON under
the key ``"sentinel"``, plus flat copies ``sentinel.schema_version``,
``sentinel.entropy``, ``sentinel.k`` and ``sentinel.feature_names`` for tools
such as Netron. The format is ONNX only: no pickle or joblib is ever read.

References: arXiv 2601.09001, Sec. 3.3 (classifier and calibration);
docs/method.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sentinel_vllm.features import FEATURE_NAMES, check_feature_matrix
from sentinel_vllm.series import canonical

__all__ = [
    "SCHEMA_VERSION",
    "INPUT_NAME",
    "OUTPUT_P",
    "OUTPUT_PROBA",
    "METADATA_KEY",
    "SentinelFileError",
    "Sentinel",
    "load_sentinel",
    "sentinel_id",
    "DEFAULT_SENTINEL",
    "resolve_sentinel_path",
]

SCHEMA_VERSION = 1
INPUT_NAME = "features"
OUTPUT_P = "p_correct"
OUTPUT_PROBA = "probabilities"
METADATA_KEY = "sentinel"
_REQUIRED_META = ("schema_version", "feature_names", "entropy", "k")

#: The embedded default sentinel, addressable as ``"default"`` wherever a sentinel file is named.
DEFAULT_SENTINEL = Path(__file__).resolve().parent / "data" / "default.onnx"


def resolve_sentinel_path(arg) -> Path:
    """Path of a sentinel named by the user; ``"default"`` (or None) is the embedded one.

    Raises
    ------
    SentinelFileError
        ``"default"`` while no default sentinel ships with this install.
    """
    if arg is None or str(arg) == "default":
        if not DEFAULT_SENTINEL.is_file():
            raise SentinelFileError(
                "no default sentinel is bundled with this install "
                f"(expected {DEFAULT_SENTINEL}); train one with `sentinel-vllm train` and pass its .onnx path"
            )
        return DEFAULT_SENTINEL
    return Path(os.fspath(arg))


class SentinelFileError(ValueError):
    """A sentinel file is missing, unreadable, not ONNX, of the wrong schema, or
    does not match the features/entropy it is asked to score."""


def sentinel_id(data: bytes) -> str:
    """Identifier of a sentinel file: ``"sentinel-"`` + first 12 hex of its sha256.

    Parameters
    ----------
    data : bytes
        The file's content.

    Returns
    -------
    str
    """
    return "sentinel-" + hashlib.sha256(data).hexdigest()[:12]


def _describe(entropy: str, k) -> str:
    return entropy if k is None else f"{entropy} (k={k})"


class Sentinel:
    """A loaded sentinel: an onnxruntime session and the file's metadata.

    Use :func:`load_sentinel` to make one. Thread-safe for scoring
    (``InferenceSession.run`` is).

    Attributes
    ----------
    id : str
        ``"sentinel-<12 hex of the file's sha256>"``.
    path : str
    metadata : dict
        feature_names (list of str), entropy (str), k (int or None),
        schema_version (int), training_slices (list), versions (dict of library
        versions), created (ISO 8601 UTC), training (dict), plus any extra keys.
    n_features : int
    """

    def __init__(self, session, metadata: dict, id: str, path: str):
        self._session = session
        self.metadata = metadata
        self.id = id
        self.path = path
        self.n_features = len(metadata["feature_names"])

    def __repr__(self) -> str:
        m = self.metadata
        return f"Sentinel({self.id}, entropy={_describe(m['entropy'], m['k'])}, path={self.path!r})"

    def _check_X(self, X) -> np.ndarray:
        return check_feature_matrix(X, self.n_features, self.metadata["feature_names"])

    def predict_proba(self, X) -> np.ndarray:
        """P(incorrect), P(correct) per row.

        Parameters
        ----------
        X : array-like of float, shape (n, n_features)
            Trajectory statistics in ``metadata["feature_names"]`` order.

        Returns
        -------
        ndarray of float64, shape (n, 2), columns ``[False, True]``.

        Raises
        ------
        ValueError
            Wrong shape or non-finite values (the message names the first).
        """
        X = self._check_X(X)
        if len(X) == 0:
            return np.zeros((0, 2))
        return self._check_p(self._session.run([OUTPUT_PROBA], {INPUT_NAME: X})[0])

    def p_correct(self, X) -> np.ndarray:
        """P(correct) per row: ndarray of float64, shape (n,). See :meth:`predict_proba`."""
        X = self._check_X(X)
        if len(X) == 0:
            return np.zeros(0)
        return self._check_p(self._session.run([OUTPUT_P], {INPUT_NAME: X})[0])

    def _check_p(self, p: np.ndarray) -> np.ndarray:
        """Refuse graph outputs that are not probabilities (a crafted or broken file)."""
        if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
            raise SentinelFileError(
                f"sentinel {self.id} ({self.path}) returned values outside [0, 1]; "
                "the file is not a valid sentinel"
            )
        return p

    def check_compatible(self, feature_names: Sequence[str], entropy: str, k: int | None = None):
        """Refuse features or an entropy series the sentinel was not trained on.

        Parameters
        ----------
        feature_names : sequence of str
            Names and order of the columns that will be scored.
        entropy : str
            ``"full"``, ``"topk"`` (with ``k``), ``"top<K>"``, ``"topk_renorm"`` or
            ``"top<K>_renorm"``.
        k : int, optional

        Raises
        ------
        SentinelFileError
            Naming the mismatch (feature schema, entropy kind, or k).
        """
        want = list(self.metadata["feature_names"])
        got = list(feature_names)
        if got != want:
            missing = [f for f in want if f not in got]
            extra = [f for f in got if f not in want]
            detail = (f"missing {missing}, unexpected {extra}" if missing or extra
                      else "same names in another order")
            raise SentinelFileError(
                f"sentinel {self.id} expects features {want}; given {got} ({detail})"
            )
        try:
            kind = canonical(entropy, k)
        except ValueError as e:
            raise SentinelFileError(f"sentinel {self.id}: {e}") from None
        mine = (self.metadata["entropy"], self.metadata["k"])
        if kind != mine:
            raise SentinelFileError(
                f"sentinel {self.id} was trained on {_describe(*mine)} entropy; "
                f"given {_describe(*kind)} entropy"
            )


_WARNED_NO_BAND: set = set()


def _warn_no_band(sent: "Sentinel") -> None:
    """Once per file: its intervals are sampling noise only (no ``band`` metadata)."""
    if sent.id in _WARNED_NO_BAND:
        return
    _WARNED_NO_BAND.add(sent.id)
    import logging

    logging.getLogger("sentinel_vllm").warning(
        "sentinel %s has no band metadata: its 95%% intervals (labelled 'sampling') are sampling "
        "noise only and leave out the sentinel's own error on unseen benchmarks and temperatures; "
        "retrain with `sentinel-vllm train --band` (two or more benchmarks) to store a band",
        sent.id)


def _fail(path, why: str):
    raise SentinelFileError(f"{path}: {why}")


def _read_metadata(model, path) -> dict:
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        _fail(path, f"an ONNX file without '{METADATA_KEY}' metadata: not a sentinel file")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as e:
        _fail(path, f"'{METADATA_KEY}' metadata is not valid JSON ({e})")
    if not isinstance(meta, dict):
        _fail(path, f"'{METADATA_KEY}' metadata must be a JSON object")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        _fail(path, f"sentinel metadata lacks {missing}")
    if meta["schema_version"] != SCHEMA_VERSION:
        _fail(path, f"sentinel schema_version {meta['schema_version']!r}; this sentinel-vllm "
                    f"reads version {SCHEMA_VERSION} (retrain or upgrade)")
    names = meta["feature_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        _fail(path, f"feature_names must be a non-empty list of str, got {names!r}")
    try:
        meta["entropy"], meta["k"] = canonical(meta["entropy"], meta["k"])
    except (ValueError, TypeError) as e:
        _fail(path, f"bad entropy kind in metadata: {e}")
    if meta.get("band") is not None:  # the 95% band of the true accuracy (sentinel_vllm/band.py)
        from sentinel_vllm.aggregate import check_band

        try:
            check_band(meta["band"])
        except ValueError as e:
            _fail(path, f"bad band in metadata: {e}")
    tk = meta.get("topk_k")  # the k of a topk feature group's series (top<topk_k>)
    if tk is not None and (isinstance(tk, bool) or not isinstance(tk, int) or tk < 1):
        _fail(path, f"topk_k in metadata must be an integer >= 1, got {tk!r}")
    return meta


def _check_graph(model, meta, path) -> None:
    from onnx import TensorProto

    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        _fail(path, f"expected one input {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    tt = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    n = len(meta["feature_names"])
    if tt.elem_type != TensorProto.DOUBLE or len(dims) != 2 or dims[1] != n:
        _fail(path, f"input {INPUT_NAME!r} must be float64 of shape (n, {n}); found elem_type "
                    f"{tt.elem_type}, dims {dims}")
    outs = {o.name for o in g.output}
    if not {OUTPUT_P, OUTPUT_PROBA} <= outs:
        _fail(path, f"outputs must include {OUTPUT_P!r} and {OUTPUT_PROBA!r}; found {sorted(outs)}")


def load_sentinel(
    path,
    *,
    feature_names: Sequence[str] | None = None,
    entropy: str | None = None,
    k: int | None = None,
    intra_op_num_threads: int | None = None,
) -> Sentinel:
    """Load a sentinel ``.onnx`` file and open an onnxruntime session on it.

    Parameters
    ----------
    path : str or path-like
    feature_names, entropy, k : optional
        If ``entropy`` is given, :meth:`Sentinel.check_compatible` is run with
        these (``feature_names`` defaults to :data:`~sentinel_vllm.features.FEATURE_NAMES`).
    intra_op_num_threads : int, optional
        onnxruntime threads per call (1 is fastest for single requests).

    Returns
    -------
    Sentinel

    Raises
    ------
    SentinelFileError
        (a ``ValueError``) for a missing or unreadable file, a pickle/joblib
        file, a file that is not ONNX, an ONNX file without sentinel metadata or
        with another schema, or a mismatch with ``feature_names``/``entropy``/``k``.
    """
    is_default = path is None or str(path) == "default"
    p = resolve_sentinel_path(path)
    if not p.exists():
        _fail(p, "no such sentinel file")
    if p.is_dir():
        _fail(p, "is a directory, not a sentinel .onnx file")
    try:
        data = p.read_bytes()
    except OSError as e:
        _fail(p, f"cannot read sentinel file ({e.strerror or e})")
    if not data:
        _fail(p, "empty file, not an ONNX sentinel")
    if data[:1] == b"\x80" or data[:2] == b"PK":
        _fail(p, "looks like a pickle/joblib/zip file; sentinel files are ONNX only and "
                 "sentinel-vllm never loads pickles (export with SentinelClassifier.export_onnx)")
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        _fail(p, f"not an ONNX file ({type(e).__name__}: {e})")
    if not model.graph.node:
        _fail(p, "not an ONNX sentinel (no graph)")
    meta = _read_metadata(model, p)
    _check_graph(model, meta, p)
    import onnxruntime as ort

    so = ort.SessionOptions()
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    try:
        sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        _fail(p, f"onnxruntime cannot load it ({type(e).__name__}: {e})")
    sent = Sentinel(sess, meta, sentinel_id(data), str(p))
    if is_default:
        import logging

        logging.getLogger("sentinel_vllm").warning(
            "using the embedded default sentinel %s, trained on %s traces of %s: estimates for "
            "another model are unvalidated (check AUROC on 100-200 labelled responses first)",
            sent.id, meta.get("trained_for_model", "an unknown model"),
            "+".join(meta.get("training_slices") or []) or "unknown slices")
    if meta.get("band") is None:
        _warn_no_band(sent)
    if entropy is not None:
        sent.check_compatible(FEATURE_NAMES if feature_names is None else feature_names, entropy, k)
    return sent
