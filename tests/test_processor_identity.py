"""Request identity: extra_args parsing and the n > 1 child-index patch of ParentRequest."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sentinel_vllm.serving.api.child_index import install_child_index_patch
from sentinel_vllm.serving.worker.identity import request_key, validate_params


def P(**xa):
    return SimpleNamespace(extra_args=xa or None)


def test_request_key():
    assert request_key(P()) is None
    assert request_key(P(sentinel_id="x")) == ("x", 0)
    assert request_key(P(sentinel_id="x", sentinel=False)) is None
    assert request_key(P(sentinel_id="")) is None
    assert request_key(P(sentinel_id="x", sentinel_child=3)) == ("x", 3)
    assert request_key(P(sentinel_id="x", sentinel_n=2)) == ("x", None)  # inferred later
    assert request_key(None) is None


def test_validate_params():
    validate_params(P(sentinel_id="x", sentinel_child=1))
    with pytest.raises(ValueError, match="sentinel_id"):
        validate_params(P(sentinel_id=5))
    with pytest.raises(ValueError, match="sentinel_child"):
        validate_params(P(sentinel_id="x", sentinel_child=-1))


@pytest.mark.vllm
@pytest.mark.parametrize("seed", [None, 7])
def test_child_patch_gives_each_child_its_index(seed):
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.v1.engine.parallel_sampling import ParentRequest

    assert install_child_index_patch() is True
    assert install_child_index_patch() is True  # idempotent
    sp = SamplingParams(n=3, seed=seed, extra_args={"sentinel_id": "abc"})
    parent = ParentRequest(SimpleNamespace(request_id="req1", external_req_id="ext1", params=sp))
    kids = [parent.get_child_info(i) for i in range(3)]
    assert [k[0] for k in kids] == ["0_req1", "1_req1", "2_req1"]
    assert [request_key(k[1]) for k in kids] == [("abc", 0), ("abc", 1), ("abc", 2)]
    assert all(k[1].n == 1 for k in kids)
    assert sp.extra_args == {"sentinel_id": "abc"}  # the parent's dict is not mutated
    plain = ParentRequest(
        SimpleNamespace(request_id="r2", external_req_id="e2", params=SamplingParams(n=2))
    )
    assert plain.get_child_info(1)[1].extra_args is None
