"""GPU mode's steady state on the emulator: no growing memory, few device->host reads.

Memory: after the second training iteration, further iterations allocate nothing that
stays alive (Caffe's fixed blobs and workspace).

On the emulator every device array is numpy memory, which numpy reports to
``tracemalloc`` (traced from the second iteration on): the live bytes after iteration 2
and after iteration 4 must be equal
(a leak of one array per iteration, a layer appending to a list, a workspace that
keeps growing all show). The same property on a real device is the memory-pool test in
test_gpu_nets.py."""
import tracemalloc

import numpy as np
import pytest

from caffelite import backend
from test_gpu_nets import corpus_train_solver


def live_numpy_bytes():
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.mark.parametrize("config", ["deeplabv2_vgg16_aspp_l/train.prototxt"])
def test_emulated_training_memory_is_flat_after_the_second_iteration(tmp_path, config):
    backend.set_mode_gpu(emulate=True)
    tracing = tracemalloc.is_tracing()
    try:
        solver = corpus_train_solver(tmp_path, config)
        solver.param.base_lr = 1e-7        # random weights: keep the loss finite
        solver.step(1)
        if not tracing:
            tracemalloc.start()
        solver.step(1)
        after_two = live_numpy_bytes()
        solver.step(2)
        after_four = live_numpy_bytes()
        kept = backend.device_module().zeros(1000, np.float64)   # the check can see a leak
        with_leak = live_numpy_bytes()
    finally:
        if not tracing:
            tracemalloc.stop()
        backend.set_mode_cpu()
    assert with_leak - after_four >= kept.nbytes
    assert after_four == after_two, f"{after_four - after_two} bytes more after 2 iterations"


@pytest.mark.parametrize("graphs", [False, True], ids=["layer_by_layer", "cuda_graphs"])
def test_emulated_training_step_reads_back_one_value_set_per_loss_and_accuracy(tmp_path,
                                                                               graphs):
    """Each device->host read stalls the host until the GPU has caught up. Per training
    step of ASPP-VGG: SoftmaxWithLoss's NaN check and VALID count (one copy), the
    SegAccuracy confusion matrix with its bad-label index (one copy; Caffe's layer reads
    it too) and the Net's loss total (one copy for all loss layers): three. A launched
    CUDA graph leaves SoftmaxWithLoss's read out (a NaN loss re-runs the pass eagerly
    to name a bad label): two."""
    from caffelite import cuda_graphs
    from caffelite.kernels import emulator
    cuda_graphs.set_enabled(graphs)
    backend.set_mode_gpu(emulate=True)
    try:
        solver = corpus_train_solver(tmp_path, "deeplabv2_vgg16_aspp_l/train.prototxt")
        solver.param.base_lr = 1e-7
        kinds = [layer.type for layer in solver.net.layers]
        solver.step(2)                  # with graphs: eager, then recorded
        before = emulator.copies_to_host[0]
        solver.step(1)
        reads = emulator.copies_to_host[0] - before
        launched = graphs and solver.net._graphs.launches() > 0
    finally:
        backend.set_mode_cpu()
    assert kinds.count("SoftmaxWithLoss") == 1 and kinds.count("SegAccuracy") == 1
    assert launched == graphs
    assert reads == (2 if graphs else 3)

