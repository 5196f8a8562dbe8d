"""A test-only repair beside OEB and SMI: on its layers, the attention output of every thinking query is scaled by
(1 + gain). It is the whole of what adding a repair takes (this module, registered on import); the engines run it
through the registry (tests/test_interventions.py, and in vLLM's processes via $STEPSCOPE_INTERVENTIONS)."""

from stepscope.core.interventions import Intervention, register_intervention
from stepscope.errors import StepscopeError


class ThinkingGain(Intervention):
    name = "toy_gain"
    title = "toy gain"
    band = "shallow"
    params = {"gain": 0.5}

    def check(self, params):
        if params["gain"] <= -1.0:
            raise StepscopeError(f"toy_gain: gain must be above -1, got {params['gain']}")

    def apply(self, out, queries, params):
        hit = queries.segment == 1  # thinking queries
        out[hit] *= 1.0 + params["gain"]
        return hit


register_intervention(ThinkingGain())
