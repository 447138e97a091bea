"""pycaffe's NetSpec: write nets in Python, get a NetParameter (prototxt) back.

::

    from caffelite import layers as L, params as P      # or: from caffe import ...
    n = caffelite.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[8, 3, 32, 32]), dict(dim=[8])], ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=16,
                            weight_filler=dict(type="msra"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.loss = L.SoftmaxWithLoss(n.pool1, n.label)
    text = str(n.to_proto())

``L.<Type>(*bottoms, **params)`` gives a Top (a tuple of Tops for ``ntop`` > 1, the
layer itself for ``ntop=0``).  A keyword goes into the type's ``<type>_param`` message
when that message has such a field, else onto the LayerParameter (``param``,
``loss_weight``, ``include``, ``name`` …); keywords ending in ``param`` always go onto
the LayerParameter.  Dicts become messages, lists repeated fields, a scalar for a
repeated field a one-element list, and enum fields also take the value's name.
``in_place=True`` makes the tops the bottoms.  Names: a Top assigned to the NetSpec is
named by its attribute, others ``<Type><n>``; a layer takes its first top's name.

``caffelite.layers`` is also the package of layer implementations: its attributes that
start with a capital letter are NetSpec layer functions (``caffelite.layers.Convolution``),
the lowercase ones its modules.
"""
from collections import Counter, OrderedDict

from google.protobuf.descriptor import FieldDescriptor

from .proto import caffe_pb2


def param_name_dict():
    """{layer type: prefix of its ``<prefix>_param`` field}, e.g. "Convolution" ->
    "convolution", from the message types of the LayerParameter's ``*_param`` fields."""
    names = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names.setdefault(type_name[:-len("Parameter")], field.name[:-len("_param")])
    return names


_param_names = param_name_dict()


def _field(proto, name):
    return proto.DESCRIPTOR.fields_by_name.get(name)


def _is_repeated(field):
    if hasattr(field, "is_repeated"):            # protobuf >= 5
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _enum_value(field, value):
    if field.enum_type is not None and isinstance(value, str):
        enum_value = field.enum_type.values_by_name.get(value)
        if enum_value is None:
            raise ValueError(f"{field.full_name}: '{value}' is not one of "
                             f"{', '.join(field.enum_type.values_by_name)}")
        return enum_value.number
    return value


def _scalar(field, value):
    value = _enum_value(field, value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()           # numpy scalars -> Python numbers
    return value


def assign_proto(proto, name, val):
    """Set field ``name`` of message ``proto`` from a Python value: dicts fill messages,
    lists (or tuples) fill repeated fields (a list of dicts adds one message each), a
    lone value for a repeated field counts as a one-element list."""
    field = _field(proto, name)
    if field is None:
        raise AttributeError(f"{proto.DESCRIPTOR.name} has no field '{name}'")
    repeated = _is_repeated(field)
    is_message = field.type == FieldDescriptor.TYPE_MESSAGE
    if repeated:
        values = list(val) if isinstance(val, (list, tuple)) else [val]
        container = getattr(proto, name)
        for item in values:
            if is_message:
                message = container.add()
                if isinstance(item, dict):
                    for k, v in item.items():
                        assign_proto(message, k, v)
                else:
                    message.CopyFrom(item)
            else:
                container.append(_scalar(field, item))
    elif is_message:
        if isinstance(val, dict):
            for k, v in val.items():
                assign_proto(getattr(proto, name), k, v)
        else:
            getattr(proto, name).CopyFrom(val)
    else:
        setattr(proto, name, _scalar(field, val))


class Top:
    """One output blob of a layer function (its ``n``-th top)."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """A NetParameter with every layer needed to compute this top."""
        return to_proto(self)

    def _update(self, params):
        self.fn.params.update(params)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)

    def __repr__(self):
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """A layer: its type, its bottoms (Tops of other layers) and its parameters."""

    def __init__(self, type_name, inputs, params):
        self.type_name = type_name
        for index, top in enumerate(inputs):
            if not isinstance(top, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is "
                                f"{type(top)})")
        self.inputs = inputs
        self.params = params
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names, autonames):
        if self not in names:
            if self.ntop > 0:
                names[self] = self._get_top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top, names, autonames):
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _assign(self, layer, key, value):
        prefix = _param_names.get(self.type_name)
        if not key.endswith("param") and prefix is not None:
            message = getattr(layer, prefix + "_param")
            if _field(message, key) is not None:
                assign_proto(message, key, value)
                return
        if _field(layer, key) is None:
            where = f"{prefix}_param nor " if prefix else ""
            raise AttributeError(f"{self.type_name} layer: '{key}' is a field of neither "
                                 f"{where}LayerParameter")
        assign_proto(layer, key, value)

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottom_names = []
        for top in self.inputs:
            top._to_proto(layers, names, autonames)
            bottom_names.append(layers[top.fn].top[top.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._get_top_name(top, names, autonames))
        layer.name = self._get_name(names, autonames)
        for key, value in self.params.items():
            self._assign(layer, key, value)
        layers[self] = layer


def to_proto(*tops):
    """A NetParameter with every layer needed to compute ``tops`` (automatic names)."""
    layers = OrderedDict()
    autonames = Counter()
    for top in tops:
        top._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Tops assigned as attributes (or items) are named by them; ``to_proto()`` gives
    the NetParameter of every layer needed for them, in order."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top '{name}'") from None

    def __delattr__(self, name):
        del self.tops[name]

    __setitem__ = __setattr__

    def __getitem__(self, name):
        return self.tops[name]

    def __delitem__(self, name):
        del self.tops[name]

    def keys(self):
        return list(self.tops.keys())

    def vals(self):
        return list(self.tops.values())

    def items(self):
        return list(self.tops.items())

    def to_proto(self):
        names = {v: k for k, v in self.tops.items()}
        autonames = Counter()
        layers = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


def _layer_function(type_name):
    def layer_fn(*args, **kwargs):
        fn = Function(type_name, args, kwargs)
        if fn.ntop == 0:
            return fn
        if fn.ntop == 1:
            return fn.tops[0]
        return fn.tops
    layer_fn.__name__ = type_name
    return layer_fn


class Layers:
    """``layers.<Type>(*bottoms, **params)`` specifies a layer of that Caffe type."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _layer_function(name)


class _EnumValues:
    def __init__(self, type_name):
        self._message = getattr(caffe_pb2, type_name + "Parameter")

    def __getattr__(self, name):
        return getattr(self._message, name)


class Parameters:
    """``params.<Type>.<VALUE>``: an enum value of ``<Type>Parameter``, e.g.
    ``params.Pooling.MAX``."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _EnumValues(name)


layers = Layers()
params = Parameters()
