"""Layer types of the DeepLab fork that are known (so every released prototxt
parses and upgrades) but whose implementation has not landed yet."""
from ..layer import LAYER_REGISTRY, Layer, register

_PENDING = {
    "Data": "LMDB/LevelDB data layers are not supported",
    "WindowData": "WindowData is not supported",
    "DenseCRF": "the dense CRF arrives with the CRF work (issue 5)",
    "BiasChannel": "weak-supervision layers arrive with issue 6",
    "AdaptiveBiasChannel": "weak-supervision layers arrive with issue 6",
    "UniqueLabel": "weak-supervision layers arrive with issue 6",
    "DomainTransform": "domain-transform layers arrive with issue 6",
    "DomainTransformForwardOnly": "domain-transform layers arrive with issue 6",
    "SpatialProduct": "SpatialProduct arrives with issue 6",
    "VideoSegData": "VideoSegData arrives with issue 6",
}


class PendingLayer(Layer):
    reason = ""

    def setup(self, bottom, top):
        raise self.error(f"layer type '{self.type}' is not implemented yet: {self.reason}")


for _type, _reason in _PENDING.items():
    if _type not in LAYER_REGISTRY:   # a real implementation, imported first, wins
        register(_type)(type(f"{_type}Layer", (PendingLayer,), {"reason": _reason}))
