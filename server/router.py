"""Which variant serves a request: a small, pure strategy.

Today: a request that pins ``model_version`` goes to that variant; any other request goes
to the model's default variant (see ``Model.default_variant``).
"""

from __future__ import annotations

from .errors import ModelNotFound, ModelNotReady
from .repository import Model, Variant
from .types import InferenceRequest


class Router:
    def choose(self, model: Model, request: InferenceRequest) -> Variant:
        """The variant that computes ``request``. Raises ModelNotFound for an unknown
        pinned version and ModelNotReady when no suitable variant is loaded."""
        if request.version:
            variant = model.variants.get(request.version)
            if variant is None:
                raise ModelNotFound(model.name, request.version)
            if not variant.ready:
                raise ModelNotReady(
                    f"model '{model.name}' version '{request.version}' is not ready: "
                    f"{variant.reason or variant.state.value}"
                )
            return variant
        variant = model.default_variant()
        if variant is None:
            raise ModelNotReady(f"model '{model.name}' has no ready variant")
        return variant
