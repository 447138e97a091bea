"""Layers that feed a net from memory: Input, DummyData, MemoryData."""
import math

import numpy as np

from ..filler import fill
from ..layer import Layer, register
from .image_data import read_transform_mean, init_transformer_rand


@register("Input")
class InputLayer(Layer):
    """Net inputs: tops of fixed shapes (one shape for all tops, or one per top), or
    unshaped until the user reshapes them (no shape at all)."""
    min_top = 1
    exact_num_bottom = 0

    def setup(self, bottom, top):
        shapes = [tuple(s.dim) for s in self.layer_param.input_param.shape]
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"Must specify 'shape' once, once per top blob, or not at all: "
                             f"{len(top)} tops vs. {len(shapes)} shapes.")
        for i, t in enumerate(top[:len(top) if shapes else 0]):
            t.reshape(shapes[0] if len(shapes) == 1 else shapes[i])

    def reshape(self, bottom, top):
        """Tops keep whatever shape the user gave them."""

    def forward(self, bottom, top):
        """The data is already in the top blobs."""


@register("DummyData")
class DummyDataLayer(Layer):
    """Tops filled by fillers: constant ones are filled once at setup, random ones at
    every forward (and not at setup: Caffe's setup forward skips them, so they draw
    nothing from the generator until the first real forward)."""
    runs_on_device = False
    min_top = 1
    exact_num_bottom = 0

    def setup(self, bottom, top):
        p = self.layer_param.dummy_data_param
        n = len(top)
        legacy = [list(f) for f in (p.num, p.channels, p.height, p.width)]
        if any(legacy) and len(p.shape):
            raise self.error("Both shape and legacy fields were specified "
                             "(dummy_data_param: shape, or num/channels/height/width)")
        if len(p.shape):
            shapes = [tuple(s.dim) for s in p.shape]
        elif any(legacy):
            if any(len(f) not in (1, n) for f in legacy):
                raise self.error("num/channels/height/width need 1 value or one per top")
            shapes = [tuple(f[0] if len(f) == 1 else f[i] for f in legacy) for i in range(n)]
        else:
            raise self.error("dummy_data_param needs shape (or num/channels/height/width)")
        if len(shapes) not in (1, n):
            raise self.error(f"needs 1 or {n} shapes, got {len(shapes)}")
        fillers = list(p.data_filler)
        if len(fillers) not in (0, 1, n):
            raise self.error(f"needs 0, 1 or {n} data_filler entries, got {len(fillers)}")
        self._fillers = []
        for i, t in enumerate(top):
            t.reshape(shapes[0] if len(shapes) == 1 else shapes[i])
            filler = fillers[0] if len(fillers) == 1 else (fillers[i] if fillers else None)
            self._fillers.append(filler)
        self._refill = [f is not None and (f.type or "constant") != "constant"
                        for f in self._fillers]
        for t, filler, refill in zip(top, self._fillers, self._refill):
            if filler is None:
                t.data[...] = 0
            elif not refill:
                fill(t, filler)

    def reshape(self, bottom, top):
        """Shapes are fixed at setup."""

    def forward(self, bottom, top):
        for t, filler, refill in zip(top, self._fillers, self._refill):
            if refill:
                fill(t, filler)


@register("MemoryData")
class MemoryDataLayer(Layer):
    """Batches from arrays handed over by ``set_input_arrays`` (pycaffe), copied into
    the tops (Caffe points its tops at the user's arrays instead).  As Caffe's, the
    label top is N at setup and N x 1 x 1 x 1 from the first forward on: Forward_cpu
    reshapes it, and the (empty) Reshape of data layers never changes it back."""
    runs_on_device = False
    exact_num_top = 2
    exact_num_bottom = 0

    def setup(self, bottom, top):
        p = self.layer_param.memory_data_param
        self.batch_size = p.batch_size
        self.shape = (p.batch_size, p.channels, p.height, p.width)
        # DataTransformer's constructor (before LayerSetUp), then DataLayerSetUp's CHECK.
        read_transform_mean(self.layer_param.transform_param, self)
        if not math.prod(self.shape) > 0:
            raise self.error(f"batch_size, channels, height, and width must be specified "
                             f"and positive (memory_data_param gives {self.shape})")
        self._data = self._labels = None
        self._pos = 0
        # BaseDataLayer::LayerSetUp's InitRand seeds an (unused) transformer.
        init_transformer_rand(self.layer_param.transform_param, self.phase)
        top[0].reshape(self.shape)
        top[1].reshape((p.batch_size,))     # vector<int> label_shape(1, batch_size_)

    def set_input_arrays(self, data, labels):
        data = np.asarray(data)
        labels = np.asarray(labels)
        if data.shape[0] % self.batch_size:
            raise self.error(f"the number of samples ({data.shape[0]}) must be a multiple of "
                             f"batch_size ({self.batch_size})")
        if tuple(data.shape[1:]) != self.shape[1:]:
            raise self.error(f"arrays of shape {data.shape[1:]} do not fit {self.shape[1:]}")
        self._data, self._labels, self._pos = data, labels.reshape(-1), 0

    def reshape(self, bottom, top):
        """Shapes change at setup and in forward only."""

    def forward(self, bottom, top):
        if self._data is None:
            raise self.error("no data: call set_input_arrays() before forward")
        top[0].reshape(self.shape)
        top[1].reshape((self.batch_size, 1, 1, 1))
        s = slice(self._pos, self._pos + self.batch_size)
        top[0].data[...] = self._data[s]
        top[1].data[...] = self._labels[s].reshape(-1, 1, 1, 1)
        self._pos = (self._pos + self.batch_size) % self._data.shape[0]
