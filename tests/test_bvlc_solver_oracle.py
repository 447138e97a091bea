"""caffelite's solvers against the real BVLC Caffe solvers, run through its own pycaffe.

Set CAFFELITE_BVLC_PYCAFFE to the launcher that scripts/bvlc_caffe_oracle.py writes (as
for tests/test_bvlc_oracle.py, whose helpers this file uses: BVLC Caffe of 2018, 1.0
and later, on the CPU); without it these tests skip.  Each case is a small net
(Convolution, BatchNorm, TanH/Sigmoid, InnerProduct, Eltwise, SoftmaxWithLoss/EuclideanLoss, on
a MemoryData layer that both sides feed the same arrays), weights that caffelite draws
and writes as a caffemodel, and a solver.  tests/oracles/bvlc_solver_runner.py's
``run_job`` runs it on both sides, caffelite in this process and Caffe in the oracle's:
``solver.step(1)`` again and again (or pycaffe's hand-written loop with
``apply_update``), comparing after each step ``solver.iter``, the gradients the step
computed, every blob's data and diff, every parameter's data and diff (the diff then
holds the update just applied), the test nets' blobs, the snapshot the solver writes
(iter, current_step, learned_net and the history blobs; its weights file) and
``solver.lr``.  The restore cases go on from a snapshot: each side restores the state
the other wrote and its own, in a fresh solver, and steps on; all must do what Caffe
does from its own.  A solve case calls ``solver.solve()`` and compares the files it
writes; a refused case is a solver Caffe refuses with a failed CHECK.

Each side first computes its own gradients, which are compared; then caffelite's run
(and Caffe's from caffelite's state) replays the gradients of Caffe's run in their
place (see the runner), so that the updates, histories and weights compare the
solvers' arithmetic alone: the adaptive solvers scale each gradient element by its own
history, which turns last-bit differences of a small element into large relative ones.

Tolerances.  Both sides compute in float32 (ulp 2**-23).  ``RTOL`` (1e-6, 8 ulp) is
asked of each element, relative to itself or to a scale: for the solvers' results
(weights, updates, histories, from the same gradients, a few float operations a step)
the largest magnitude of the array; for what the nets compute by summing products in
another order (numpy's vs OpenBLAS's), a few ulp of the largest product, which can be
far above an element where the terms cancel: the step's gradient scale
(``_gradient_scale``) for gradients, 1 for blob values (``_compare``).  The learning rate is one float32 computed from the same float32
fields: 1 ulp (the oracle's GCC uses powf/expf where caffelite, as the fork's GCC, uses
pow/exp in double; README "Known differences").

Where caffelite follows the DeepLab fork (BVLC Caffe of early 2016) or documents a
deliberate difference, the case is a strict xfail giving the reason.
"""
import json
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from google.protobuf import text_format

import caffelite
from test_bvlc_oracle import (HAVE_H5PY, HERE, PYCAFFE, TRAIN, _finished,  # noqa: F401
                              _boost_of_the_oracle, _load_oracle_module)

pytestmark = pytest.mark.skipif(
    not PYCAFFE or not os.path.exists(PYCAFFE),
    reason="set CAFFELITE_BVLC_PYCAFFE (scripts/bvlc_caffe_oracle.py)")

_runner = _load_oracle_module("bvlc_solver_runner")

RTOL = 1e-6             # 8 float32 ulp, see the module docstring
LR_RTOL = 2.0 ** -23    # 1 float32 ulp

# ------------------------------------------------------------------------------ nets
CLS_NET = '''name: "cls"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 3 height: 3 width: 3 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 2 } }
layer { name: "tanh1" type: "TanH" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
'''

# Multipliers (lr_mult 0 with a decay, decay_mult 0, fractional ones), parameters shared
# by name between two layers with different inputs (the second spec sets no multiplier),
# and a layer that sends no gradient to its bottom (propagate_down: false).
FEATURES_NET = '''name: "features"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 3 height: 3 width: 3 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 0 decay_mult: 1 } param { lr_mult: 1 decay_mult: 2.5 }
  convolution_param { num_output: 4 kernel_size: 2 } }
layer { name: "tanh1" type: "TanH" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "data" top: "conv2"
  param { lr_mult: 0.5 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 2 } }
layer { name: "tanh2" type: "TanH" bottom: "conv2" top: "conv2" }
layer { name: "ip_a" type: "InnerProduct" bottom: "conv1" top: "ip_a"
  param { name: "shared_w" lr_mult: 1.5 decay_mult: 0.5 }
  param { name: "shared_b" lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 } }
layer { name: "ip_b" type: "InnerProduct" bottom: "conv2" top: "ip_b"
  param { name: "shared_w" } param { name: "shared_b" }
  inner_product_param { num_output: 3 } }
layer { name: "ip_aux" type: "InnerProduct" bottom: "conv1" top: "ip_aux"
  propagate_down: false
  param { lr_mult: 3 decay_mult: 1 } param { lr_mult: 0 decay_mult: 1 }
  inner_product_param { num_output: 3 } }
layer { name: "sum" type: "Eltwise" bottom: "ip_a" bottom: "ip_b" bottom: "ip_aux"
  top: "sum" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "sum" bottom: "label" top: "loss" }
'''

REG_NET = '''name: "reg"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 3 channels: 2 height: 2 width: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 } }
layer { name: "sig1" type: "Sigmoid" bottom: "ip1" top: "sig1" }
layer { name: "ip2" type: "InnerProduct" bottom: "sig1" top: "ip2"
  inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "label" top: "loss"
  loss_weight: 2 }
'''

# Parameters shared by three layers where only the second spec sets the multipliers (the
# owner's learnable blob takes them), and a bottom convolution frozen whole (lr_mult 0 on
# both blobs: no backward at all) that still has a weight decay.
SHARED_LATE_NET = '''name: "shared_late"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 2 height: 3 width: 3 } }
layer { name: "conv0" type: "Convolution" bottom: "data" top: "conv0"
  param { lr_mult: 0 decay_mult: 1 } param { lr_mult: 0 decay_mult: 1 }
  convolution_param { num_output: 3 kernel_size: 2 } }
layer { name: "tanh0" type: "TanH" bottom: "conv0" top: "conv0" }
layer { name: "conv1" type: "Convolution" bottom: "conv0" top: "conv1"
  param { name: "k" } param { name: "kb" }
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "tanh1" type: "TanH" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  param { name: "k" lr_mult: 3 decay_mult: 2 } param { name: "kb" lr_mult: 0.5 }
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "tanh2" type: "TanH" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  param { name: "k" } param { name: "kb" }
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv3" top: "ip"
  inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  loss_weight: 0.5 }
'''

FILLERS_NET = CLS_NET.replace(
    "kernel_size: 2 }", 'kernel_size: 2 weight_filler { type: "gaussian" std: 0.5 } '
    'bias_filler { type: "uniform" min: -0.5 max: 0.5 } }').replace(
    "num_output: 3 }", 'num_output: 3 weight_filler { type: "xavier" } '
    'bias_filler { type: "gaussian" std: 0.3 } }')

# A BatchNorm (batch statistics in TRAIN) without param specs: its LayerSetUp adds
# lr_mult 0 ones, so no update (weight decay included) touches the three statistics.
BN_NET = CLS_NET.replace(
    'layer { name: "tanh1"',
    'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n'
    'layer { name: "tanh1"')

NETS = {"cls": (CLS_NET, 12, 3), "features": (FEATURES_NET, 12, 3), "reg": (REG_NET, 9, None),
        "fillers": (FILLERS_NET, 12, 3), "shared_late": (SHARED_LATE_NET, 8, 3),
        "batchnorm": (BN_NET, 12, 3)}


# ----------------------------------------------------------------------------- cases
@dataclass
class SolverCase:
    name: str
    solver: str                 # the solver's own fields (net and snapshot_prefix added)
    net: str = "cls"
    steps: int = 5
    restore_at: int = None      # restore cases: the snapshot (its iter) to go on from
    cls: str = "get_solver"     # or a solver class to construct
    solve: bool = False         # solver.solve() instead of steps
    manual: bool = False        # forward, backward and solver.apply_update() instead
    test_nets: bool = False     # the test nets get the arrays too, and are compared
    weights_field: bool = False  # the solver's `weights` loads the caffemodel
    refused: str = None         # Caffe refuses the solver (a failed CHECK); caffelite's
                                # error must match this pattern (the field it names)
    net_field: str = "net"      # or train_net, or train_net_param (the net inline)
    fillers: bool = False       # no caffemodel: the fillers draw (solver random_seed)
    xfail: str = None           # a documented difference from BVLC 1.0 ...
    same_lr: bool = False       # ... that leaves solver.lr alone

    @property
    def hdf5(self):
        return "HDF5" in self.solver

    @property
    def reads_lr(self):
        # BVLC's solver.lr advances a multistep schedule; caffelite's does not (documented
        # in Solver.lr): read only where the getter changes nothing
        return "multistep" not in self.solver


SGD = 'type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"'
ADAM = ('type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 delta: 1e-8 '
        'weight_decay: 0.01 lr_policy: "fixed"')
FORK_LR_CHECKS = (
    "the fork's GetLearningRate (BVLC of early 2016, as BVLC 1.0's) checks neither "
    "gamma >= 0 nor a sigmoid's stepsize > 0; BVLC added those CHECKs in 2018 (PR #6104), "
    "which the oracle's build has; caffelite computes the fork's rate")
NAN_RATE = ("caffelite stops on a NaN learning rate (poly past max_iter with a fractional "
            "power), where Caffe applies it and the weights go NaN (README 'Known "
            "differences')")
ADAM_MOMENTUM = ("caffelite refuses Adam's momentum outside [0, 1), where Caffe's updates go "
                 "NaN (README 'Known differences', AdamSolver._check_solver_params)")
RMSPROP_FORK_DEFAULT = (
    "rms_decay has no default in the fork's caffe.proto (caffelite: 0), BVLC 1.0 declares "
    "0.99 (caffelite/proto/caffe.proto, README 'Known differences', tests/test_proto.py)")

CASES = [
    # every solver type, as `type` and as the legacy `solver_type` enum
    SolverCase("sgd", SGD),
    SolverCase("sgd_legacy", SGD.replace('type: "SGD"', "solver_type: SGD")),
    SolverCase("nesterov", 'type: "Nesterov" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 '
               'lr_policy: "fixed"'),
    SolverCase("nesterov_legacy", 'solver_type: NESTEROV base_lr: 0.05 momentum: 0.95 '
               'weight_decay: 0.02 lr_policy: "fixed"'),
    SolverCase("adagrad", 'type: "AdaGrad" base_lr: 0.1 weight_decay: 0.01 '
               'lr_policy: "fixed"'),
    SolverCase("adagrad_legacy", 'solver_type: ADAGRAD base_lr: 0.2 delta: 1e-5 '
               'weight_decay: 0.02 lr_policy: "fixed"'),
    SolverCase("rmsprop", 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.9 delta: 1e-6 '
               'weight_decay: 0.01 lr_policy: "fixed"'),
    SolverCase("rmsprop_legacy", 'solver_type: RMSPROP base_lr: 0.02 rms_decay: 0.95 '
               'lr_policy: "fixed"'),
    SolverCase("rmsprop_default_decay", 'type: "RMSProp" base_lr: 0.01 delta: 1e-6 '
               'lr_policy: "fixed"', xfail=RMSPROP_FORK_DEFAULT, same_lr=True),
    SolverCase("adadelta", 'type: "AdaDelta" base_lr: 1.0 momentum: 0.95 delta: 1e-6 '
               'weight_decay: 0.01 lr_policy: "fixed"'),
    SolverCase("adadelta_legacy", 'solver_type: ADADELTA base_lr: 0.5 momentum: 0.9 '
               'delta: 1e-4 lr_policy: "fixed"'),
    SolverCase("adam", ADAM),
    SolverCase("adam_legacy", 'solver_type: ADAM base_lr: 0.02 momentum: 0.8 '
               'momentum2: 0.99 lr_policy: "fixed"'),
    # a solver class constructed directly (pycaffe's caffe.AdamSolver(file) ...)
    SolverCase("class_adam", ADAM, cls="AdamSolver"),
    SolverCase("class_nesterov_untyped", 'base_lr: 0.1 momentum: 0.9 lr_policy: "fixed"',
               cls="NesterovSolver"),
    # every learning-rate policy
    SolverCase("lr_step", SGD.replace('"fixed"', '"step" stepsize: 2 gamma: 0.5'), steps=6),
    SolverCase("lr_exp", SGD.replace('"fixed"', '"exp" gamma: 0.8')),
    SolverCase("lr_inv", SGD.replace('"fixed"', '"inv" gamma: 0.3 power: 0.75')),
    SolverCase("lr_multistep", SGD.replace(
        '"fixed"', '"multistep" stepvalue: 1 stepvalue: 3 stepvalue: 4 gamma: 0.5'), steps=6),
    SolverCase("lr_poly", SGD.replace('"fixed"', '"poly" power: 0.9 max_iter: 7'), steps=6),
    SolverCase("lr_poly_square", SGD.replace('"fixed"', '"poly" power: 2 max_iter: 10')
               .replace("0.1", "0.2")),
    SolverCase("lr_sigmoid", SGD.replace('"fixed"', '"sigmoid" gamma: 0.7 stepsize: 3'),
               steps=6),
    # regularization, clipping, iter_size
    SolverCase("l2_explicit", 'type: "SGD" base_lr: 0.1 weight_decay: 0.05 '
               'regularization_type: "L2" lr_policy: "fixed"'),
    SolverCase("l1", SGD.replace("0.01", "0.05") + ' regularization_type: "L1"'),
    SolverCase("l1_adam", ADAM.replace("0.01 lr", "0.05 lr") + ' regularization_type: "L1"'),
    SolverCase("l1_adagrad", 'type: "AdaGrad" base_lr: 0.1 weight_decay: 0.03 '
               'regularization_type: "L1" lr_policy: "fixed"'),
    SolverCase("clip", SGD + " clip_gradients: 0.05"),
    SolverCase("clip_not_reached", SGD + " clip_gradients: 1000"),
    SolverCase("clip_adam", ADAM + " clip_gradients: 0.1"),
    SolverCase("iter_size3", SGD + " iter_size: 3"),
    SolverCase("iter_size2_clip", SGD + " iter_size: 2 clip_gradients: 0.1"),
    SolverCase("iter_size2_adadelta", 'type: "AdaDelta" base_lr: 1.0 momentum: 0.95 '
               'delta: 1e-6 weight_decay: 0.01 lr_policy: "fixed" iter_size: 2'),
    SolverCase("iter_size2_adam", ADAM + " iter_size: 2"),
    # lr_mult / decay_mult (0 too), shared parameters, propagate_down: false
    SolverCase("features_sgd", SGD, net="features"),
    SolverCase("features_nesterov_l1", 'type: "Nesterov" base_lr: 0.1 momentum: 0.9 '
               'weight_decay: 0.02 regularization_type: "L1" lr_policy: "fixed"',
               net="features"),
    SolverCase("features_adagrad", 'type: "AdaGrad" base_lr: 0.1 weight_decay: 0.01 '
               'lr_policy: "fixed"', net="features"),
    SolverCase("features_rmsprop", 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.9 '
               'delta: 1e-6 weight_decay: 0.01 lr_policy: "fixed"', net="features"),
    SolverCase("features_adadelta", 'type: "AdaDelta" base_lr: 1.0 momentum: 0.95 '
               'delta: 1e-6 weight_decay: 0.01 lr_policy: "fixed"', net="features"),
    SolverCase("features_adam", ADAM, net="features"),
    SolverCase("features_iter_size2_clip", SGD + " iter_size: 2 clip_gradients: 0.2",
               net="features"),
    SolverCase("shared_late_sgd", SGD, net="shared_late"),
    SolverCase("shared_late_adagrad", 'type: "AdaGrad" base_lr: 0.1 weight_decay: 0.01 '
               'lr_policy: "fixed"', net="shared_late"),
    SolverCase("shared_late_adam_l1_clip", ADAM + ' regularization_type: "L1" '
               "clip_gradients: 0.3", net="shared_late"),
    SolverCase("regression_sgd", SGD.replace('"fixed"', '"inv" gamma: 0.1 power: 0.5'),
               net="reg"),
    SolverCase("regression_rmsprop", 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.98 '
               'delta: 1e-6 weight_decay: 0.001 lr_policy: "fixed"', net="reg"),
    SolverCase("regression_adam_hdf5", ADAM + " snapshot_format: HDF5", net="reg"),
    # snapshot / restore: each side goes on from the other's state and from its own
    SolverCase("restore_sgd", SGD, restore_at=3),
    SolverCase("restore_sgd_hdf5", SGD + " snapshot_format: HDF5", restore_at=3),
    SolverCase("restore_nesterov", 'type: "Nesterov" base_lr: 0.1 momentum: 0.9 '
               'weight_decay: 0.01 lr_policy: "fixed"', restore_at=2),
    SolverCase("restore_adagrad", 'type: "AdaGrad" base_lr: 0.1 weight_decay: 0.01 '
               'lr_policy: "fixed"', restore_at=3),
    SolverCase("restore_rmsprop_hdf5", 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.9 '
               'delta: 1e-6 lr_policy: "fixed" snapshot_format: HDF5', restore_at=3),
    SolverCase("restore_adadelta", 'type: "AdaDelta" base_lr: 1.0 momentum: 0.95 '
               'delta: 1e-6 weight_decay: 0.01 lr_policy: "fixed"', restore_at=3),
    SolverCase("restore_adadelta_hdf5", 'type: "AdaDelta" base_lr: 1.0 momentum: 0.95 '
               'delta: 1e-6 weight_decay: 0.01 lr_policy: "fixed" snapshot_format: HDF5',
               restore_at=2, net="features"),
    SolverCase("restore_adam", ADAM, restore_at=3),
    SolverCase("restore_adam_hdf5", ADAM + " snapshot_format: HDF5", restore_at=2),
    SolverCase("restore_multistep", SGD.replace(   # current_step 2 at the snapshot
        '"fixed"', '"multistep" stepvalue: 1 stepvalue: 2 stepvalue: 5 gamma: 0.5'),
        steps=6, restore_at=3),
    SolverCase("restore_multistep_hdf5", SGD.replace(
        '"fixed"', '"multistep" stepvalue: 1 stepvalue: 4 gamma: 0.5') +
        " snapshot_format: HDF5", steps=6, restore_at=3),
    SolverCase("restore_step_features", SGD.replace('"fixed"', '"step" stepsize: 2 '
               'gamma: 0.5'), net="features", steps=6, restore_at=3),
    SolverCase("restore_poly_iter_size", SGD.replace('"fixed"', '"poly" power: 0.9 '
               'max_iter: 8') + " iter_size: 2", steps=6, restore_at=4),
    # pycaffe's other ways in: a hand-written loop, test nets, the solver's `weights`
    SolverCase("manual_apply_update", SGD.replace('"fixed"', '"step" stepsize: 2 '
               'gamma: 0.5'), manual=True),
    SolverCase("manual_apply_update_adam", ADAM + " iter_size: 2", manual=True),
    SolverCase("test_net", SGD + " test_iter: 2 test_interval: 2", test_nets=True),
    SolverCase("test_net_no_initialization", SGD + " test_iter: 1 test_interval: 3 "
               "test_initialization: false", test_nets=True),
    SolverCase("weights_field", SGD + ' weights: "../weights.caffemodel"',
               weights_field=True),
    SolverCase("train_net_field", ADAM, net_field="train_net"),
    SolverCase("train_net_param_inline", SGD + " iter_size: 2", net_field="train_net_param"),
    SolverCase("random_seed_fillers", SGD + " random_seed: 1701", net="fillers",
               fillers=True),
    SolverCase("random_seed_zero_fillers", SGD + " random_seed: 0", net="fillers",
               fillers=True),      # 0 is a seed: only a negative one leaves it unset
    SolverCase("batchnorm_statistics_not_learned", SGD, net="batchnorm"),
    SolverCase("snapshot_diff", SGD + " snapshot_diff: true"),
    SolverCase("snapshot_diff_hdf5", ADAM + " snapshot_diff: true snapshot_format: HDF5"),
    # where Caffe's weights go NaN
    SolverCase("lr_poly_past_max_iter", SGD.replace('"fixed"', '"poly" power: 0.5 '
               'max_iter: 3'), steps=5, xfail=NAN_RATE),
    SolverCase("adam_momentum_1", ADAM.replace("momentum: 0.9", "momentum: 1"),
               xfail=ADAM_MOMENTUM),
    # solvers Caffe refuses
    SolverCase("refuse_type_and_solver_type", SGD + " solver_type: NESTEROV",
               refused=r"both the deprecated solver_type .* and type"),
    SolverCase("refuse_unknown_policy", SGD.replace('"fixed"', '"bogus"'),
               refused="unknown lr_policy 'bogus'"),
    SolverCase("refuse_step_without_stepsize", SGD.replace('"fixed"', '"step"'),
               refused="lr_policy 'step' needs stepsize > 0"),
    SolverCase("refuse_unknown_regularization", SGD + ' regularization_type: "L3"',
               refused="unknown regularization_type 'L3'"),
    SolverCase("refuse_adagrad_momentum", 'type: "AdaGrad" base_lr: 0.1 momentum: 0.9 '
               'lr_policy: "fixed"', refused="momentum cannot be used with AdaGrad"),
    SolverCase("refuse_rmsprop_momentum", 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.9 '
               'momentum: 0.5 lr_policy: "fixed"',
               refused="momentum cannot be used with RMSProp"),
    SolverCase("refuse_rmsprop_decay_1", 'type: "RMSProp" base_lr: 0.01 rms_decay: 1 '
               'lr_policy: "fixed"', refused=r"rms_decay should lie in \[0, 1\), got 1"),
    SolverCase("refuse_sigmoid_negative_gamma", SGD.replace(
        '"fixed"', '"sigmoid" gamma: -0.5 stepsize: 2'), refused="gamma",
        xfail=FORK_LR_CHECKS),
    SolverCase("refuse_exp_negative_gamma", SGD.replace('"fixed"', '"exp" gamma: -0.5'),
               refused="gamma", xfail=FORK_LR_CHECKS),
    SolverCase("refuse_sigmoid_without_stepsize", SGD.replace(
        '"fixed"', '"sigmoid" gamma: 0.5'), refused="stepsize", xfail=FORK_LR_CHECKS),
    # solver.solve(): the snapshots it writes, the final one included
    SolverCase("solve_snapshots", SGD.replace("fixed", "step") +
               " stepsize: 3 gamma: 0.5 max_iter: 7 snapshot: 3", solve=True),
    SolverCase("solve_no_final_snapshot", ADAM + " max_iter: 5 snapshot: 2 "
               "snapshot_after_train: false", solve=True),
    SolverCase("solve_display_test", SGD + " max_iter: 6 display: 3 test_iter: 2 "
               "test_interval: 3", solve=True, test_nets=True),
    SolverCase("solve_snapshots_hdf5", ADAM + " max_iter: 4 snapshot: 2 "
               "snapshot_format: HDF5", solve=True),
]
assert len({case.name for case in CASES}) == len(CASES)

# ----------------------------------------------------------------------------- runs
RESTORE_RUNS = ("bvlc_from_bvlc", "bvlc_from_cl", "cl_from_bvlc", "cl_from_cl")


def _state_suffix(case):
    return ".solverstate.h5" if case.hdf5 else ".solverstate"


def _write_case(case, folder):
    """net.prototxt, solver.prototxt, weights.caffemodel (caffelite's random weights)
    and arrays.npz (the MemoryData inputs) in the case's folder."""
    text, count, classes = NETS[case.net]
    (folder / "net.prototxt").write_text(text)
    max_iter = "" if "max_iter" in case.solver else " max_iter: 100"
    train = (f"train_net_param {{\n{text}}}" if case.net_field == "train_net_param"
             else f'{case.net_field}: "../net.prototxt"')
    (folder / "solver.prototxt").write_text(
        f'{train}\nsnapshot_prefix: "snap"\nsolver_mode: CPU\n{case.solver}{max_iter}\n')
    rng = np.random.default_rng([20261207, zlib.crc32(case.name.encode())])
    net = caffelite.Net(str(folder / "net.prototxt"), TRAIN)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.standard_normal(blob.shape) * 0.5
    net.save(str(folder / "weights.caffemodel"))
    shape = (count,) + tuple(net.blobs["data"].shape[1:])
    data = rng.standard_normal(shape).astype(np.float32)
    labels = (rng.integers(0, classes, count) if classes else
              rng.standard_normal(count)).astype(np.float32)
    np.savez(folder / "arrays.npz", data=data, labels=labels)


def _job(folder, case, steps, restore=None, replay=None):
    """A run folder and its job.json (see bvlc_solver_runner.py): from the caffemodel,
    or from the snapshot ``restore`` = (folder, name) copied in; ``replay``: the run
    whose gradients this one's updates take."""
    folder.mkdir()
    job = {"solver": "../solver.prototxt", "prefix": "snap", "class": case.cls,
           "arrays": "../arrays.npz", "steps": steps, "lr": case.reads_lr,
           "solve": case.solve}
    if replay:
        job["replay"] = f"../{replay}/result.npz"
    job.update(manual=case.manual, test_arrays=case.test_nets)
    if restore:
        source, name = restore
        model = ".caffemodel.h5" if case.hdf5 else ".caffemodel"
        for suffix in (model, _state_suffix(case)):
            if (source / (name + suffix)).exists():     # (else the run fails)
                shutil.copy(source / (name + suffix), folder / (name + suffix))
        job["restore"] = name + _state_suffix(case)
    elif not (case.weights_field or case.fillers):
        job["weights"] = "../weights.caffemodel"
    (folder / "job.json").write_text(json.dumps(job))


def _run_caffelite(folder):
    try:
        _runner.run_job(caffelite, str(folder))
    except Exception as error:
        (folder / "error.txt").write_text(f"{type(error).__name__}: {error}")


def _oracle(folders):
    runner = os.path.join(HERE, "oracles", "bvlc_solver_runner.py")
    return subprocess.run([PYCAFFE, runner] + [str(f) for f in folders],
                          capture_output=True, text=True, timeout=600)


def _run_oracle(folders):
    """The jobs in one oracle process, then one process per job a failed CHECK left
    unfinished; each job's stderr tail where it left no result."""
    done = _oracle(folders)
    for folder in folders:
        if not _finished(folder):
            alone = done if len(folders) == 1 else _oracle([folder])
            if not _finished(folder):
                (folder / "error.txt").write_text(
                    f"no result (rc {alone.returncode}): {alone.stderr[-2000:]}")


def _result(folder):
    if (folder / "result.npz").exists():
        with np.load(folder / "result.npz") as result:
            return dict(result)
    return (folder / "error.txt").read_text()


def _runs_here(case):
    return HAVE_H5PY or not case.hdf5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every run's result (a dict of arrays, or the error) by (case, run): "bvlc" and
    "cl" from the caffemodel, and for a restore case the four RESTORE_RUNS.  Caffe's
    runs go first; caffelite's (and Caffe's from caffelite's state) replay the
    gradients of Caffe's run from the same start (see bvlc_solver_runner.py), after
    comparing their own."""
    root = tmp_path_factory.mktemp("bvlc_solver_cases")
    cases = [case for case in CASES if _runs_here(case)]
    for case in cases:
        folder = root / case.name
        folder.mkdir()
        _write_case(case, folder)
        steps = 0 if case.solve else case.steps
        _job(folder / "bvlc", case, steps)
        _job(folder / "cl", case, steps, replay=None if case.refused else "bvlc")
    for case in cases:          # each in a process of its own: Caffe aborts
        if case.refused:
            _run_oracle([root / case.name / "bvlc"])
    _run_oracle([root / case.name / "bvlc" for case in cases if not case.refused])
    for case in cases:
        _run_caffelite(root / case.name / "cl")
    restored = [case for case in cases if case.restore_at]
    for case in restored:
        folder, name = root / case.name, f"snap_iter_{case.restore_at}"
        for run in RESTORE_RUNS:
            source = folder / ("bvlc" if run.endswith("_bvlc") else "cl")
            _job(folder / run, case, case.steps - case.restore_at, (source, name),
                 replay=None if run == "bvlc_from_bvlc" else "bvlc_from_bvlc")
    _run_oracle([root / case.name / "bvlc_from_bvlc" for case in restored])
    for case in restored:
        for run in ("cl_from_bvlc", "cl_from_cl"):
            _run_caffelite(root / case.name / run)
    _run_oracle([root / case.name / "bvlc_from_cl" for case in restored])
    out = {"root": root}
    for case in cases:
        runs = ("bvlc", "cl") + (RESTORE_RUNS if case.restore_at else ())
        for run in runs:
            out[case.name, run] = _result(root / case.name / run)
            if isinstance(out[case.name, run], dict) and case.hdf5:
                out[case.name, run].update(_hdf5_states(root / case.name / run))
    return out


def _hdf5_states(folder):
    """What each HDF5 snapshot a step wrote holds, under the keys the runner gives a
    binary one (read with h5py here, as the oracle has no h5py)."""
    import h5py
    out = {}
    with np.load(folder / "result.npz") as result:
        steps = {int(result[k]): k[:-len("iter")] for k in result.files
                 if k.startswith("step") and k.endswith("/iter")}
    for it, prefix in steps.items():
        with h5py.File(folder / f"snap_iter_{it}.solverstate.h5", "r") as f:
            out[prefix + "state/iter"] = np.int64(np.asarray(f["iter"][()]).reshape(-1)[0])
            out[prefix + "state/current_step"] = np.int64(
                np.asarray(f["current_step"][()]).reshape(-1)[0])
            learned = f["learned_net"][()]
            learned = learned.item() if isinstance(learned, np.ndarray) else learned
            out[prefix + "state/learned_net"] = np.array(
                learned.split(b"\0")[0].decode() if isinstance(learned, bytes) else learned)
            for i in range(len(f["history"])):
                out[prefix + f"state/history/{i}"] = np.asarray(f["history"][str(i)][()])
    return out


# ----------------------------------------------------------------------------- checks
def _agree(ours, theirs, key, scale=0.0):
    """Within RTOL of each element or of ``scale`` (at least the array's largest
    magnitude); integers and strings exactly."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (key, ours.shape, theirs.shape)
    if theirs.dtype.kind not in "f":
        assert ours.tolist() == theirs.tolist(), (key, ours, theirs)
        return
    assert np.isfinite(theirs).all() and np.isfinite(ours).all(), key
    scale = max(scale, float(np.abs(theirs).max(initial=0.0)))
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=RTOL * scale, err_msg=key)


def _kind(key):
    """A result key's kind: data, diff, param, pdiff, grad, state ... (after its step and
    test net)."""
    parts = key.split("/")
    if parts[0].startswith(("step", "restored", "solved")):
        parts = parts[1:]
    return parts[1] if re.fullmatch(r"test\d+", parts[0]) else parts[0]


def _gradient_scale(theirs, prefix):
    """The largest product a gradient of the step sums: a top gradient times a bottom
    value (the largest blob diff times the largest blob value, or 1).  Summed in another
    order, a gradient is off by a few ulp of that, which can be far above the gradient
    itself where the terms cancel (a bias's softmax gradient sums p - 1 over a batch)."""
    def largest(kinds):
        return max((float(np.abs(v).max(initial=0.0)) for k, v in theirs.items()
                    if k.startswith(prefix) and _kind(k) in kinds), default=0.0)
    return largest(("diff", "grad")) * max(1.0, largest(("data",)))


def _both(results, case, ours_run="cl", theirs_run="bvlc"):
    ours, theirs = results[case.name, ours_run], results[case.name, theirs_run]
    assert isinstance(theirs, dict), f"Caffe failed ({theirs_run}): {theirs}"
    assert isinstance(ours, dict), f"{ours_run} failed: {ours}"
    return ours, theirs


def _compare(ours, theirs, keys, what):
    """The keys' arrays, each within RTOL of a scale: the gradients the nets computed
    (blob diffs, the parameters' before the update), of the step's gradient scale; the
    blob values (inputs, weights, TanH and Sigmoid outputs, probabilities: all of
    magnitude about 1, and a small loss is -log p of a p near 1), of 1; the solver's
    results (parameters, updates, histories: its arithmetic on the same gradients, see
    bvlc_solver_runner.py's replay), of their own largest magnitude."""
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"{what}: caffelite lacks {missing[:8]}"
    scales = {}
    for key in sorted(keys):
        prefix, kind = key.split("/")[0] + "/", _kind(key)
        if kind in ("diff", "grad") and prefix not in scales:
            scales[prefix] = _gradient_scale(theirs, prefix)
        scale = scales[prefix] if kind in ("diff", "grad") else float(kind == "data")
        _agree(ours[key], theirs[key], f"{what}: {key}", scale)


def _is_state(key):
    return "/state/" in key


def _cases(keep, lr=False):
    """The cases ``keep`` takes, a documented difference as a strict xfail (unless the
    test compares only ``lr`` and the difference leaves it alone)."""
    return [pytest.param(case, marks=pytest.mark.xfail(reason=case.xfail, strict=True))
            if case.xfail and not (lr and case.same_lr) else case
            for case in CASES if keep(case)]


def _skip_without_h5py(case):
    if not _runs_here(case):
        pytest.skip("HDF5 snapshots: needs h5py")


STEPPED = lambda c: not (c.solve or c.refused)     # noqa: E731


@pytest.mark.parametrize("case", _cases(STEPPED), ids=lambda c: c.name)
def test_steps_match_bvlc(results, case):
    """After every step: iter, the loss and every blob's data and diff, every parameter
    and its update (the diff Net::Update subtracted)."""
    _skip_without_h5py(case)
    ours, theirs = _both(results, case)
    keys = [k for k in theirs if k.startswith("step") and not _is_state(k)
            and not k.endswith("/lr")]
    _compare(ours, theirs, keys, case.name)


@pytest.mark.parametrize("case", _cases(STEPPED), ids=lambda c: c.name)
def test_snapshots_match_bvlc(results, case):
    """What the solverstate written after every step holds: iter, current_step,
    learned_net and the history blobs (two per parameter for AdaDelta and Adam, one for
    the others, the shared parameters' once)."""
    _skip_without_h5py(case)
    ours, theirs = _both(results, case)
    keys = [k for k in theirs if _is_state(k)]
    assert keys
    assert sorted(k for k in ours if _is_state(k)) == sorted(keys)
    _compare(ours, theirs, keys, case.name)


@pytest.mark.parametrize("case", _cases(lambda c: c.reads_lr and STEPPED(c), lr=True),
                         ids=lambda c: c.name)
def test_lr_matches_bvlc(results, case):
    """pycaffe's solver.lr after every step (the rate of the next update)."""
    _skip_without_h5py(case)
    ours, theirs = _both(results, case)
    for key in sorted(k for k in theirs if k.endswith("/lr")):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=LR_RTOL, atol=0,
                                   err_msg=f"{case.name}: {key}")


@pytest.mark.parametrize("run", RESTORE_RUNS[1:])
@pytest.mark.parametrize("case", _cases(lambda c: c.restore_at), ids=lambda c: c.name)
def test_restore_matches_bvlc(results, case, run):
    """A fresh solver restores the snapshot taken after ``restore_at`` steps and steps
    on: caffelite from Caffe's state (cl_from_bvlc), Caffe from caffelite's
    (bvlc_from_cl) and caffelite from its own (cl_from_cl) all do what Caffe does from
    its own: the restored iter and weights, then every step's arrays and snapshot."""
    _skip_without_h5py(case)
    ours, theirs = _both(results, case, run, "bvlc_from_bvlc")
    assert int(theirs["restored/iter"]) == case.restore_at
    _compare(ours, theirs, [k for k in theirs if not k.endswith("/lr")], f"{case.name} {run}")
    for key in sorted(k for k in theirs if k.endswith("/lr")):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=LR_RTOL, atol=0, err_msg=key)


@pytest.mark.parametrize("case", _cases(lambda c: c.solve), ids=lambda c: c.name)
def test_solve_matches_bvlc(results, case):
    """solver.solve(): the final iter, the net's arrays and the snapshot files written
    (every ``snapshot`` iterations and the last one)."""
    _skip_without_h5py(case)
    ours, theirs = _both(results, case)
    ours, theirs = dict(ours), dict(theirs)
    files = str(theirs.pop("solved/files")).split("\n")
    assert str(ours.pop("solved/files")).split("\n") == files
    _compare(ours, theirs, list(theirs), case.name)


@pytest.mark.parametrize("case", _cases(lambda c: c.refused), ids=lambda c: c.name)
def test_refused_as_by_bvlc(results, case):
    """A solver Caffe refuses (a failed CHECK, when it is built or at its first update)
    caffelite refuses too, with an error."""
    ours, theirs = results[case.name, "cl"], results[case.name, "bvlc"]
    assert isinstance(theirs, str), "Caffe ran the solver"
    assert re.search(r"^F\d{4} .*(Check failed|Unknown)", theirs, re.M), theirs
    assert isinstance(ours, str), "caffelite ran a solver that Caffe refuses"
    assert re.search(case.refused, ours), ours


def _caffemodel(path):
    """A binary snapshot's layers: (name, the LayerParameter as text without its blobs,
    [(shape, data, diff or None) per blob])."""
    from caffelite.proto import caffe_pb2
    net = caffe_pb2.NetParameter()
    net.ParseFromString(path.read_bytes())
    layers = []
    for layer in net.layer:
        blobs = [(tuple(b.shape.dim), np.array(b.data, np.float32),
                  np.array(b.diff, np.float32) if len(b.diff) else None) for b in layer.blobs]
        layer.ClearField("blobs")
        layers.append((layer.name, text_format.MessageToString(layer), blobs))
    return net.name, list(net.input), layers


def _caffemodel_h5(path):
    import h5py
    with h5py.File(path, "r") as f:
        arrays = {}
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.mark.parametrize("case", _cases(STEPPED), ids=lambda c: c.name)
def test_snapshot_caffemodel_matches_bvlc(results, case):
    """The weights file of the last snapshot (Net::ToProto, or the HDF5 one): the
    same layers with the same parameters (phase set), blobs (and diffs with
    snapshot_diff)."""
    _skip_without_h5py(case)
    _both(results, case)
    folder = results["root"] / case.name
    name = f"snap_iter_{case.steps}.caffemodel" + (".h5" if case.hdf5 else "")
    if case.hdf5:
        ours, theirs = (_caffemodel_h5(folder / run / name) for run in ("cl", "bvlc"))
        assert sorted(ours) == sorted(theirs)
        _compare(ours, theirs, list(theirs), name)
        return
    ours, theirs = (_caffemodel(folder / run / name) for run in ("cl", "bvlc"))
    assert ours[:2] == theirs[:2]
    assert [layer[:2] for layer in ours[2]] == [layer[:2] for layer in theirs[2]]
    for (layer, _, mine), (_, _, their) in zip(ours[2], theirs[2]):
        assert [b[0] for b in mine] == [b[0] for b in their], layer
        for i, ((_, data, diff), (_, their_data, their_diff)) in enumerate(zip(mine, their)):
            _agree(data, their_data, f"{layer} blob {i}")
            assert (diff is None) == (their_diff is None), f"{layer} blob {i} diff"
            if diff is not None:
                _agree(diff, their_diff, f"{layer} blob {i} diff")
