"""MATLAB .mat files as DeepLab's MatWrite/MatRead use them.

One single-precision variable ``data`` with dims ``[W, H, C, N]``: the blob's
row-major NCHW buffer viewed column-major (spec section 4).  Written as an
uncompressed level-5 file (what matio's default produces); read with scipy (v5) or
pymatreader (v7.3/HDF5).
"""
import os

import numpy as np


class MatFileError(ValueError):
    pass


def blob_to_mat_array(blob_nchw):
    """NCHW array -> the [W, H, C, N] array MATLAB sees in the file."""
    a = np.asarray(blob_nchw)
    a = a.reshape((1,) * (4 - a.ndim) + a.shape) if a.ndim < 4 else a
    return np.ascontiguousarray(a.transpose(3, 2, 1, 0))


def mat_array_to_blob(array):
    """[W, H, C, N] (trailing singleton dims possibly dropped) -> NCHW."""
    a = np.asarray(array)
    if a.ndim > 4:
        raise MatFileError(f"variable 'data' has {a.ndim} dimensions; at most 4 are allowed")
    a = a.reshape(a.shape + (1,) * (4 - a.ndim))
    return a.transpose(3, 2, 1, 0)


def write_mat(path, blob_nchw):
    import scipy.io
    data = blob_to_mat_array(np.asarray(blob_nchw, dtype=np.float32))
    tmp = f"{path}.tmp{os.getpid()}.mat"
    try:
        scipy.io.savemat(tmp, {"data": data}, format="5", do_compression=False,
                         oned_as="column")
        os.replace(tmp, path)
    except OSError as e:
        raise MatFileError(f"cannot write '{path}': {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_mat(path, variable="data"):
    """Return the NCHW float32 array stored in ``variable`` of a .mat file."""
    if not os.path.exists(path):
        raise MatFileError(f"MAT file not found: '{path}'")
    try:
        import scipy.io
        contents = scipy.io.loadmat(path, squeeze_me=False)
    except NotImplementedError:   # v7.3 (HDF5)
        import pymatreader
        contents = pymatreader.read_mat(path)
    except (ValueError, OSError) as e:
        raise MatFileError(f"cannot read MAT file '{path}': {e}") from None
    if variable not in contents:
        raise MatFileError(f"'{path}' has no variable '{variable}'")
    return mat_array_to_blob(np.asarray(contents[variable], dtype=np.float32))
