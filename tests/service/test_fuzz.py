"""Whatever JSON is posted to /v1/jobs, the answer is a 2xx or a JSON 4xx: never a 5xx."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.conftest import Service, auth, ops_graph

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                                          inner, max_size=4),
                     max_leaves=20)
_keys = st.sampled_from(["graph", "template", "params", "labels", "inputs", "class_type"])
_node = st.fixed_dictionaries({"class_type": st.sampled_from(["EmptyImage", "SaveImage", "Nope", ""]) | _json,
                               "inputs": st.dictionaries(st.sampled_from(["width", "height", "batch_size", "images",
                                                                          "color"]), _json, max_size=4) | _json})
_bodies = (
    _json
    | st.dictionaries(_keys, _json, max_size=4)
    | st.builds(lambda nodes: {"graph": nodes}, st.dictionaries(st.text(max_size=3), _node | _json, max_size=4))
    | st.builds(lambda params: {"template": "cpu_model_free_ops", "params": params},
                st.dictionaries(st.sampled_from(["width", "height", "color", "nope"]), _json, max_size=3))
    | st.builds(lambda labels: {"graph": ops_graph(), "labels": labels}, _json)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies)
async def test_random_bodies_get_2xx_or_4xx(service: Service, body: Any) -> None:
    data = json.dumps(body).encode()
    async with service.session.post(f"{service.url}/v1/jobs", data=data, headers=auth()) as resp:
        assert 200 <= resp.status < 500, (resp.status, await resp.text())
        answer = await resp.json()
    if resp.status >= 400:
        assert set(answer["error"]) >= {"type", "message"}
