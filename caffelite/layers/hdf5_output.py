"""HDF5Output: BVLC Caffe's layer that writes its two bottoms into an HDF5 file."""
import logging
import os

import numpy as np

from ..backend import to_host
from ..blob import legacy_shape
from ..layer import Layer, LayerError, register

logger = logging.getLogger("caffelite")

DATA_DATASET, LABEL_DATASET = "data", "label"


def refuse_truncating_an_input(layer_params):
    """Refuse a net whose HDF5Output would empty, when the net is built, a file that an
    HDF5Data layer of the same net reads (listed in its ``source``): Caffe's setup
    truncates it all the same, so a mere ``caffe.Net(...)`` or ``caffelite time`` would
    destroy that input.  ``layer_params``: the net's layers after the phase/stage
    filter; it is checked before any layer is set up.  Only files that exist count (no
    data to lose otherwise); a list that cannot be read is left to HDF5Data's own
    error."""
    outputs = [lp for lp in layer_params
               if lp.type == "HDF5Output" and lp.hdf5_output_param.file_name
               and os.path.isfile(lp.hdf5_output_param.file_name)]
    if not outputs:
        return
    from .image_data import C_TOKEN
    for data in layer_params:
        if data.type != "HDF5Data":
            continue
        source = data.hdf5_data_param.source
        try:
            with open(source, "rb") as f:
                listed = C_TOKEN.findall(os.fsdecode(f.read()))
        except OSError:
            continue
        for out in outputs:
            file_name = out.hdf5_output_param.file_name
            for path in listed:
                try:
                    same = os.path.samefile(path, file_name)
                except (OSError, ValueError):
                    same = False
                if same:
                    raise LayerError(
                        f"layer '{out.name}' (HDF5Output): hdf5_output_param.file_name "
                        f"'{file_name}' is the file '{path}' that layer '{data.name}' "
                        f"(HDF5Data) reads (listed in '{source}'); HDF5Output empties "
                        f"its file when the net is built, as Caffe's does, which would "
                        f"destroy that input: write the output to another file")


@register("HDF5Output")
class HDF5OutputLayer(Layer):
    """Writes bottom[0] as dataset "data" and bottom[1] as "label" of
    ``hdf5_output_param.file_name``, in the net's dtype, each as a 4-axis
    num x channels x height x width array (Caffe copies them into 4-D blobs first, so
    an N x C bottom is saved as N x C x 1 x 1).

    As in Caffe, setup creates the file, truncating one that exists (Caffe holds it open
    for the layer's lifetime), and the first forward writes both datasets. Caffe's
    second forward cannot create the datasets again and aborts (BVLC issue #1726); here
    it raises an error and the file keeps the first batch. No tops, no backward. Needs
    the optional ``h5py`` package.
    """
    runs_on_device = False
    writes_files = True
    exact_num_bottom = 2
    exact_num_top = 0

    def setup(self, bottom, top):
        p = self.layer_param.hdf5_output_param
        if not p.file_name:
            raise self.error("hdf5_output_param.file_name must name the HDF5 file to write")
        self.file_name = p.file_name
        h5py = self._h5py()
        try:
            with h5py.File(self.file_name, "w"):
                pass
        except OSError as e:
            raise self.error(f"failed to create HDF5 file '{self.file_name}': {e}") from None
        self.saved = False

    def _h5py(self):
        from ..io.solverstate import require_h5py
        try:
            return require_h5py()
        except ImportError:
            raise self.error("writing HDF5 files needs the h5py package "
                             "(pip install h5py)") from None

    def reshape(self, bottom, top):
        pass

    def _legacy_array(self, blob, which):
        legacy = legacy_shape(blob.shape)
        if legacy is None:
            raise self.error(f"bottom {which} has {len(blob.shape)} axes; Caffe's "
                             f"HDF5Output saves num x channels x height x width blobs "
                             f"(at most 4)")
        return np.ascontiguousarray(to_host(blob.data), dtype=self.dtype).reshape(legacy)

    def forward(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.error(f"data and label must have the same num (batch size): "
                             f"{bottom[0].shape} vs {bottom[1].shape}")
        if self.saved:
            raise self.error(
                f"'{self.file_name}' already holds the datasets '{DATA_DATASET}' and "
                f"'{LABEL_DATASET}' of this layer's first forward; Caffe's HDF5Output "
                f"writes one batch per net and fails on the next forward, and so does "
                f"this one (the file keeps the first batch)")
        data = self._legacy_array(bottom[0], 0)
        label = self._legacy_array(bottom[1], 1)
        logger.info("Saving HDF5 file %s", self.file_name)
        h5py = self._h5py()
        try:
            with h5py.File(self.file_name, "r+") as f:
                for name in (DATA_DATASET, LABEL_DATASET):
                    if name in f:
                        raise self.error(f"HDF5 file '{self.file_name}' already has a "
                                         f"dataset '{name}'")
                f.create_dataset(DATA_DATASET, data=data)
                f.create_dataset(LABEL_DATASET, data=label)
        except OSError as e:
            raise self.error(f"failed to write HDF5 file '{self.file_name}': {e}") from None
        self.saved = True
        logger.info("Successfully saved %d rows", data.shape[0])

    def backward(self, top, propagate_down, bottom):
        """Caffe's HDF5Output backward does nothing."""
