"""Layer types of the DeepLab fork that are known (so every released prototxt
parses and upgrades) but whose implementation has not landed yet."""
from ..layer import LAYER_REGISTRY, Layer, register

_PENDING = {
    "WindowData": "WindowData is not supported",
}


class PendingLayer(Layer):
    reason = ""
    runs_on_device = False      # data layers: they would feed the net from the host

    def setup(self, bottom, top):
        raise self.error(f"layer type '{self.type}' is not implemented yet: {self.reason}")


for _type, _reason in _PENDING.items():
    if _type not in LAYER_REGISTRY:   # a real implementation, imported first, wins
        register(_type)(type(f"{_type}Layer", (PendingLayer,), {"reason": _reason}))
