"""The caffelite command line: Caffe's verbs, glog lines, one-line errors."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = '''
name: "${NAME}"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } shape { dim: 2 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
'''


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "caffelite.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


def test_python_dash_m_caffelite_is_the_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "caffelite", "upgrade", "--help"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: caffelite upgrade")
    done = subprocess.run([sys.executable, "-m", "caffelite", "test", "--model", "missing"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.startswith("caffelite test: error: ")


@pytest.mark.parametrize("args", [["--version"], ["-version"], ["-version", "train"]])
def test_version_flag_prints_the_version_like_caffe(args):
    """``caffe --version`` prints "caffe version X" and exits 0 (gflags' spelling and a
    verb after it as well)."""
    import caffelite
    done = run(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"caffelite version {caffelite.__version__}\n"


GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


def test_test_verb_logs_batches_and_means(tmp_path, untrained):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    out = run("test", "--model", str(net), "--weights", untrained, "--iterations", "3",
              "-D", "NAME=n", "--log", str(tmp_path / "log.txt"))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    batch = [l for l in lines if "Batch 2, loss = " in l]
    assert batch and GLOG.match(batch[0])
    assert any(re.search(r"\] loss = [\d.]+ \(\* 1 = [\d.]+ loss\)", l) for l in lines)
    assert "Batch 0, loss" in (tmp_path / "log.txt").read_text()


def test_test_verb_sums_in_float_like_caffe(tmp_path, untrained):
    """tools/caffe.cpp's test() adds each batch's outputs in float and divides in float:
    1000 batches of a constant 0.1 output mean 0.099999, not 0.1; the weighted mean is
    the float product."""
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "d" type: "DummyData" top: "c" dummy_data_param {\n'
                   '  shape { dim: 1 } data_filler { type: "constant" value: 0.1 } } }\n'
                   'layer { name: "w" type: "Power" bottom: "c" top: "w" loss_weight: 3 }\n')
    out = run("test", "--model", str(net), "--weights", untrained, "--iterations", "1000")
    assert out.returncode == 0, out.stderr
    total = np.float32(0)
    for _ in range(1000):
        total = np.float32(total + np.float32(0.1))
    mean = total / np.float32(1000)
    expected = "w = %g (* 3 = %g loss)" % (mean, np.float32(3) * mean)
    assert expected == "w = 0.099999 (* 3 = 0.299997 loss)"
    assert re.search(r"\] " + re.escape(expected) + "$", out.stderr, re.M), out.stderr[-500:]
    loss = np.float32(0)
    for _ in range(1000):                    # each batch's loss: 3 * 0.1 in float
        loss = np.float32(loss + np.float32(3) * np.float32(0.1))
    assert re.search(r"\] Loss: %s$" % re.escape("%g" % (loss / np.float32(1000))),
                     out.stderr, re.M)


def test_test_verb_keeps_the_files_state_level(tmp_path, untrained):
    """`caffe test` in the fork builds Net(model, TEST): the prototxt's state { level }
    decides which layers exist unless --level is given."""
    net = tmp_path / "net.prototxt"
    net.write_text(NET.replace("${NAME}", "n") + 'state { level: 2 }\n' +
                   'layer { name: "deep" type: "Power" bottom: "ip" top: "deep" '
                   'include { min_level: 2 } }\n')
    kept = run("test", "--model", str(net), "--weights", untrained, "--iterations", "1")
    assert kept.returncode == 0, kept.stderr
    assert re.search(r"\] deep = ", kept.stderr)
    lowered = run("test", "--model", str(net), "--weights", untrained, "--iterations", "1",
                  "--level", "0")
    assert lowered.returncode == 0, lowered.stderr
    assert "deep = " not in lowered.stderr and re.search(r"\] loss = ", lowered.stderr)


def test_caffe_verbs_take_gflags_single_dash_flags(tmp_path, untrained):
    """`caffe test -model m -iterations 2` (gflags) runs as it is; -D defines and
    negative values are left alone."""
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    out = run("test", "-model", str(net), "-weights", untrained, "-iterations=2", "-DNAME=n",
              "-level", "-1")
    assert out.returncode == 0, out.stderr
    assert "Batch 1, loss = " in out.stderr and "Batch 2," not in out.stderr


def test_missing_define_is_one_line_error(tmp_path, untrained):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    out = run("test", "--model", str(net), "--weights", untrained, "--iterations", "1")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "NAME (line 2)" in out.stderr and str(net) in out.stderr


def test_time_verb_prints_per_layer_averages(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    out = run("time", "--model", str(net), "--iterations", "2", "-D", "NAME=n")
    assert out.returncode == 0, out.stderr
    assert re.search(r"ip\tforward: [\d.e-]+ ms\.", out.stderr)
    assert "Average Forward-Backward:" in out.stderr


def test_time_runs_every_layers_backward_as_caffe_time_does(tmp_path, monkeypatch):
    """caffe time calls each layer's Backward itself, so a deploy net (no loss: no layer
    needs a backward) still times its convolutions' weight gradients."""
    from caffelite import cli
    from caffelite.layers.conv import ConvolutionLayer
    net = tmp_path / "deploy.prototxt"
    net.write_text('input: "data" input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5 '
                   'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                   'convolution_param { num_output: 3 kernel_size: 3 } }')
    calls = []
    backward = ConvolutionLayer.backward
    monkeypatch.setattr(ConvolutionLayer, "backward",
                        lambda self, top, down, bottom: (calls.append(list(down)),
                                                         backward(self, top, down, bottom)))
    assert cli.main(["time", "--model", str(net), "--iterations", "2"]) == 0
    assert calls == [[False]] * 2          # the timed passes; the set-up pass needs none


def test_caffes_tool_programs_run_by_name_or_through_a_link(tmp_path, monkeypatch):
    """Scripts calling $TOOLS/upgrade_net_proto_text in out (or convert_imageset ...):
    the tool's name as the verb, or as the name of a link to caffelite."""
    from caffelite import cli
    src = tmp_path / "v1.prototxt"
    src.write_text('name: "v1" layers { name: "r" type: RELU bottom: "x" top: "x" }\n')
    assert cli.main(["upgrade_net_proto_text", str(src), str(tmp_path / "a.prototxt")]) == 0
    assert 'type: "ReLU"' in (tmp_path / "a.prototxt").read_text()
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "bin" / "upgrade_net_proto_text"),
                                      str(src), str(tmp_path / "b.prototxt")])
    assert cli.main() == 0
    assert (tmp_path / "b.prototxt").read_text() == (tmp_path / "a.prototxt").read_text()
    assert cli._as_tool_verbs(["in", "out"], "/x/upgrade_net_proto_binary.bin") == [
        "upgrade", "--binary", "in", "out"]
    assert cli._as_tool_verbs(["-resize_height=8", "/r/", "l.txt", "db"],
                              "convert_imageset") == [
        "convert_imageset", "-resize_height=8", "/r/", "l.txt", "db"]
    assert cli._as_tool_verbs(["upgrade_solver_proto_text", "s", "t"], "caffelite") == [
        "upgrade", "--solver", "s", "t"]
    assert cli._as_tool_verbs(["train", "-solver", "s"], "/x/caffe.bin") == [
        "train", "-solver", "s"]
    assert cli._as_tool_verbs(["b", "o", "lmdb"], "examples/convert_cifar_data.bin") == [
        "convert_cifar_data", "b", "o", "lmdb"]
    assert cli._as_tool_verbs(["a.ppm"], "/d/prog_refine_pascal_v4") == [
        "refine_pascal_v4", "a.ppm"]


def test_upgrade_verb_writes_v2_text(tmp_path):
    src = tmp_path / "v1.prototxt"
    src.write_text('name: "v1"\ninput: "data"\ninput_dim: 1\ninput_dim: 1\ninput_dim: 5\n'
                   'input_dim: 5\nlayers { name: "c" type: CONVOLUTION bottom: "data" top: "c" '
                   'blobs_lr: 1 blobs_lr: 2 convolution_param { num_output: 2 kernel_size: 3 '
                   'hole: 2 } }\n')
    dst = tmp_path / "v2.prototxt"
    out = run("upgrade", str(src), str(dst))
    assert out.returncode == 0, out.stderr
    text = dst.read_text()
    assert 'type: "Convolution"' in text and "dilation: 2" in text and "lr_mult: 2" in text
    assert "hole" not in text and "layers" not in text
    import caffelite as caffe
    net = caffe.Net(str(dst), caffe.TEST)
    assert net.blobs["c"].shape == (1, 2, 1, 1)


def test_upgrade_binary_writes_a_v2_caffemodel_opencv_reads_alike(tmp_path):
    """upgrade_net_proto_binary: the corpus' 2014 V1 caffemodel becomes V2 (layer
    entries, blobs kept); OpenCV gives the corpus output from it."""
    cv2 = pytest.importorskip("cv2")
    from conftest import corpus_path
    from caffelite.proto import caffe_pb2
    folder = corpus_path("models", "cifar10_quick_v1")
    dst = tmp_path / "v2.caffemodel"
    out = run("upgrade", "--binary", os.path.join(folder, "cifar10_quick_iter_5000.caffemodel"),
              str(dst))
    assert out.returncode == 0, out.stderr
    assert "Wrote upgraded NetParameter binary proto" in out.stderr
    net = caffe_pb2.NetParameter.FromString(dst.read_bytes())
    assert len(net.layers) == 0 and net.layer[1].type == "Convolution"
    assert [p.lr_mult for p in net.layer[1].param] == [1, 2]
    ocv = cv2.dnn.readNetFromCaffe(os.path.join(folder, "cifar10_quick.prototxt"), str(dst))
    ocv.setInput(np.load(os.path.join(folder, "input.npy")))
    np.testing.assert_array_equal(ocv.forward("prob"),
                                  np.load(os.path.join(folder, "output_prob.npy")))
    text = tmp_path / "net.prototxt"
    text.write_text(NET)
    out = run("upgrade", "--binary", str(text), str(tmp_path / "x.caffemodel"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "x.caffemodel").exists()


def test_upgrade_solver_turns_solver_type_into_type(tmp_path):
    src = tmp_path / "solver.prototxt"
    src.write_text('net: "n.prototxt"\nbase_lr: 0.01\nsolver_type: ADAM\n')
    dst = tmp_path / "new.prototxt"
    out = run("upgrade", "--solver", str(src), str(dst))
    assert out.returncode == 0, out.stderr
    assert dst.read_text() == 'base_lr: 0.01\nnet: "n.prototxt"\ntype: "Adam"\n'


def test_bad_weights_file_is_one_line_error(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    bad = tmp_path / "w.caffemodel"
    bad.write_bytes(b"\x0a\xff\xff")
    out = run("test", "--model", str(net), "--weights", str(bad), "-D", "NAME=n")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "truncated or corrupt" in out.stderr and str(bad) in out.stderr


# ------------------------------------------------------- train: the solver's solver_mode
def train_env(**changes):
    """The environment of a `caffelite train` subprocess: no GPU visible (CUDA sees none,
    with or without CuPy), the solver's own mode unless ``changes`` set one."""
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    for name in ("CAFFELITE_SOLVER_MODE", "CAFFELITE_GPU_EMULATOR"):
        env.pop(name, None)
    env.update(changes)
    return env


def write_solver(tmp_path, mode_lines):
    net = tmp_path / "net.prototxt"
    net.write_text(NET.replace("${NAME}", "n"))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 2\n'
                      f'display: 1\nsnapshot_after_train: false\n{mode_lines}')
    return solver


def run_train(solver, env, *flags):
    return subprocess.run([sys.executable, "-m", "caffelite.cli", "train", "--solver",
                           str(solver), *flags], capture_output=True, text=True, env=env)


def test_train_reads_the_solver_once_and_dumps_the_gpu_it_trains_on(tmp_path):
    """caffe.cpp's train() reads the solver file once (its upgrade lines appear once)
    and sets device_id to the GPU it uses before the solver logs its parameters."""
    solver = write_solver(tmp_path, "solver_type: NESTEROV\nmomentum: 0.9\n"
                                    "solver_mode: CPU\n")
    out = run_train(solver, train_env())
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Attempting to upgrade input file specified using deprecated "
                            "'solver_type' field") == 1
    assert "device_id" not in out.stderr
    out = run_train(solver, train_env(CAFFELITE_GPU_EMULATOR="1"), "--gpu", "0")
    assert out.returncode == 0, out.stderr
    assert "\nsolver_mode: CPU\ndevice_id: 0\nnet: " in out.stderr


def test_train_without_gpu_flag_falls_back_to_the_cpu_when_the_solver_wants_a_gpu(tmp_path):
    """Caffe's train(): without --gpu, solver_mode GPU (the proto's default) means GPU
    device_id. With no usable GPU caffelite warns, naming the solver, and trains on the
    CPU instead of stopping (every corpus solver says solver_mode: GPU)."""
    solver = write_solver(tmp_path, "")
    out = run_train(solver, train_env())
    assert out.returncode == 0, out.stderr
    warning = [l for l in out.stderr.splitlines() if l.startswith("W")]
    assert len(warning) == 1 and GLOG.match(warning[0])
    assert f"{solver} (solver_mode: GPU, the default) asks for GPU 0, which cannot be used: " in warning[0]
    assert "training on the CPU" in warning[0] and "without --gpu" not in warning[0]
    assert "] Use CPU." in out.stderr and "Iteration 2, loss = " in out.stderr


def test_train_uses_the_solvers_device_id(tmp_path):
    """solver_mode: GPU with device_id 2 trains on GPU 2 (here the emulated GPU)."""
    solver = write_solver(tmp_path, "solver_mode: GPU\ndevice_id: 2\n")
    out = run_train(solver, train_env(CAFFELITE_GPU_EMULATOR="1"))
    assert out.returncode == 0, out.stderr
    assert "] Using GPUs 2" in out.stderr and "Iteration 2, loss = " in out.stderr
    assert "] GPU 2: emulated GPU" in out.stderr
    assert "Use CPU." not in out.stderr


def test_train_solver_mode_cpu_and_the_environment_override(tmp_path):
    solver = write_solver(tmp_path, "solver_mode: CPU\ndevice_id: 1\n")
    out = run_train(solver, train_env())
    assert out.returncode == 0, out.stderr
    assert "] Use CPU." in out.stderr and "GPU" not in out.stderr
    # CAFFELITE_SOLVER_MODE overrides the file either way.
    out = run_train(solver, train_env(CAFFELITE_SOLVER_MODE="gpu", CAFFELITE_GPU_EMULATOR="1"))
    assert out.returncode == 0 and "] Using GPUs 1" in out.stderr, out.stderr
    gpu_solver = write_solver(tmp_path, "solver_mode: GPU\n")
    out = run_train(gpu_solver, train_env(CAFFELITE_SOLVER_MODE="CPU"))
    assert out.returncode == 0 and "] Use CPU." in out.stderr, out.stderr
    assert not [l for l in out.stderr.splitlines() if l.startswith("W")]
    out = run_train(gpu_solver, train_env(CAFFELITE_SOLVER_MODE="tpu"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "caffelite train: error: CAFFELITE_SOLVER_MODE must be cpu or gpu, got 'tpu'")


def test_train_with_an_explicit_gpu_flag_does_not_fall_back(tmp_path):
    """--gpu is the user's own request: without a usable GPU it is an error."""
    solver = write_solver(tmp_path, "solver_mode: CPU\n")
    out = run_train(solver, train_env(), "--gpu", "0")
    assert out.returncode == 1
    assert "caffelite train: error: GPU mode needs" in out.stderr.strip().splitlines()[-1]


# ------------------------------------------------------- Caffe's flags on every verb
STAGED_NET = NET.replace("${NAME}", "staged") + '''
layer { name: "sa" type: "Power" bottom: "ip" top: "sa" include { stage: "a" } }
layer { name: "sb" type: "Power" bottom: "ip" top: "sb" include { stage: "b" } }
'''


def test_stage_flag_is_split_on_commas_like_caffes(tmp_path, untrained):
    """get_stages_from_flags splits -stage on commas: -stage a,b builds both staged
    layers; a repeated flag keeps its last value (gflags)."""
    net = tmp_path / "net.prototxt"
    net.write_text(STAGED_NET)
    out = run("test", "-model", str(net), "-weights", untrained, "-iterations", "1",
              "-stage", "a,b")
    assert out.returncode == 0, out.stderr
    assert "Batch 0, sa = " in out.stderr and "Batch 0, sb = " in out.stderr
    out = run("test", "-model", str(net), "-weights", untrained, "-iterations", "1",
              "-stage", "a", "-stage", "b")
    assert out.returncode == 0, out.stderr
    assert "Batch 0, sa = " not in out.stderr and "Batch 0, sb = " in out.stderr
    out = run("time", "-model", str(net), "-iterations", "1", "-stage", "b", "-level", "0")
    assert out.returncode == 0, out.stderr
    assert re.search(r"\] {9}sb\tforward: ", out.stderr)       # "] " + setw(10) << name
    assert not re.search(r"\bsa\tforward", out.stderr)
    # caffe::Timer on the CPU counts whole milliseconds (boost's total_milliseconds)
    assert re.search(r"Iteration: 1 forward-backward time: \d+ ms\.", out.stderr)
    total = int(re.search(r"Total Time: (\d+) ms\.", out.stderr).group(1))
    average = re.search(r"Average Forward-Backward: ([\d.e+-]+) ms\.", out.stderr).group(1)
    assert float(average) == total           # one iteration: the total over 1


def test_every_caffe_flag_is_accepted_by_every_caffe_verb(tmp_path, untrained):
    """gflags are global: a flag a verb does not use is ignored, as in Caffe, so copied
    command lines run (e.g. `caffe time -model m -weights w`)."""
    net = tmp_path / "net.prototxt"
    net.write_text(NET.replace("${NAME}", "n"))
    weights = tmp_path / "w.caffemodel"
    out = run("test", "-model", str(net), "-weights", untrained, "-iterations", "1",
              "-phase", "TRAIN", "-solver", "s.prototxt", "-snapshot", "x.solverstate",
              "-sigint_effect", "stop")
    assert out.returncode == 0, out.stderr
    assert "Batch 0, loss = " in out.stderr
    out = run("time", "-model", str(net), "-iterations", "1", "-weights", str(weights),
              "-solver", "s.prototxt")
    assert out.returncode == 0, out.stderr
    solver = write_solver(tmp_path, "solver_mode: CPU\n")
    out = run_train(solver, train_env(), "-iterations", "9", "-model", "m", "-phase", "TEST",
                    "-level", "0", "-stage", "x")
    assert out.returncode == 0, out.stderr
    lines = [l.split("] ", 1)[-1] for l in out.stderr.splitlines()]
    assert lines.count("Optimization Done.") == 2 and "Starting Optimization" in lines
    assert "stage: \"x\"" in out.stderr          # the solver's train_state, as logged


def test_train_resumes_with_caffes_log_lines(tmp_path):
    solver = write_solver(tmp_path, "solver_mode: CPU\nsnapshot: 1\n"
                                    f'snapshot_prefix: "{tmp_path}/s"\n')
    assert run_train(solver, train_env()).returncode == 0
    out = run_train(solver, train_env(), "-snapshot", str(tmp_path / "s_iter_1.solverstate"))
    assert out.returncode == 0, out.stderr
    lines = [l.split("] ", 1)[-1] for l in out.stderr.splitlines()]
    resume = lines.index(f"Resuming from {tmp_path}/s_iter_1.solverstate")
    assert resume < lines.index("Starting Optimization") < lines.index("Optimization Done.")
    assert "Iteration 1, loss = " in out.stderr and "Iteration 0, loss" not in out.stderr


def test_device_query(monkeypatch, capsys, tmp_path):
    """`caffe device_query -gpu 0`: Caffe::DeviceQuery's lines from the device's
    properties (a stand-in CuPy here); without -gpu, none (the fork's get_gpus)."""
    import types
    from caffelite import cli, kernels
    from caffelite.log import logger
    props = {"major": 9, "minor": 0, "name": b"NVIDIA H200", "totalGlobalMem": 150 << 30,
             "sharedMemPerBlock": 49152, "regsPerBlock": 65536, "warpSize": 32,
             "memPitch": 2147483647, "maxThreadsPerBlock": 1024,
             "maxThreadsDim": (1024, 1024, 64), "maxGridSize": (2147483647, 65535, 65535),
             "clockRate": 1980000, "totalConstMem": 65536, "textureAlignment": 512,
             "deviceOverlap": 1, "multiProcessorCount": 132, "kernelExecTimeoutEnabled": 0}
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1,
                                    getDeviceProperties=lambda i: props)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(kernels, "require_cupy", lambda: fake)
    handlers = list(logger.handlers)
    try:
        assert cli.main(["device_query", "-gpu", "0", "--log", str(tmp_path / "log")]) == 0
        err = (tmp_path / "log").read_text()
        assert cli.main(["device_query", "--log", str(tmp_path / "none")]) == 0
        none = (tmp_path / "none").read_text()
    finally:
        for h in list(logger.handlers):
            if h not in handlers:
                logger.removeHandler(h)
    lines = [l.split("] ", 1)[-1] for l in err.splitlines()]
    assert lines[lines.index("Querying GPUs 0") + 1:][:5] == [
        "Device id:                     0", "Major revision number:         9",
        "Minor revision number:         0", "Name:                          NVIDIA H200",
        f"Total global memory:           {150 << 30}"]
    assert "Maximum dimension of block:    1024, 1024, 64" in lines
    assert "Concurrent copy and execution: Yes" in lines
    assert "Kernel execution timeout:      No" in lines
    assert none.rstrip().endswith("] Querying GPUs") and "Device id" not in none


def test_net_init_logs_caffes_lines(tmp_path, untrained):
    """Net::Init's INFO lines: the filtered net, each layer's bottoms and tops (in-place
    marked), its top shapes as Blob::shape_string, loss weights, the running data
    memory, the backward decisions from the last layer and the outputs."""
    net = tmp_path / "net.prototxt"
    relu = 'layer { name: "r" type: "ReLU" bottom: "ip" top: "ip" }\n'
    text = NET.replace("${NAME}", "n")
    loss_at = text.index('layer { name: "loss"')
    net.write_text(text[:loss_at] + relu + text[loss_at:])
    out = run("test", "-model", str(net), "-weights", untrained, "-iterations", "1")
    assert out.returncode == 0, out.stderr
    lines = [l.split("] ", 1)[1] for l in out.stderr.splitlines() if GLOG.match(l)]
    start = lines.index("Creating layer data")     # the layer factory's line first
    assert lines[start:start + 8] == [
        "Creating layer data", "Creating Layer data", "data -> data", "data -> label",
        "Setting up data", "Top shape: 2 3 4 4 (96)", "Top shape: 2 (2)",
        "Memory required for data: 392"]
    loss = lines.index("Creating layer loss")
    # SoftmaxWithLoss's LayerSetUp makes its Softmax through the factory: a second line
    assert lines[loss:loss + 10] == [
        "Creating layer loss", "Creating Layer loss", "loss <- ip", "loss <- label",
        "loss -> loss", "Creating layer loss", "Setting up loss", "Top shape: (1)",
        "    with loss weight 1",
        "Memory required for data: 444"]   # the in-place top counts again, as in Caffe
    assert "r -> ip (in-place)" in lines
    decisions = [l for l in lines if l.endswith("backward computation.")]
    assert decisions == ["loss needs backward computation.", "r needs backward computation.",
                         "ip needs backward computation.",
                         "data does not need backward computation."]
    assert lines.index("This network produces output loss") < \
        lines.index("Network initialization done.")
    # FilterNet keeps the state Net(file, phase) set, so Caffe's dump shows it
    assert 'Initializing net from parameters: \nname: "n"\nstate {\n  phase: TEST\n}\n' \
           'layer {\n' in out.stderr


def glog_files(folder, severity):
    """The file glog's ``<program>.<SEVERITY>`` link names, after checking its name and
    its three header lines; returns its log lines (a multi-line message, such as the
    solver's parameters, continues on lines of its own, as in Caffe's logs)."""
    link = folder / f"caffelite.{severity}"
    target = os.readlink(link)
    assert re.fullmatch(rf"caffelite\..+\.log\.{severity}\.\d{{8}}-\d{{6}}\.\d+", target)
    lines = (folder / target).read_text().splitlines()
    assert lines[0].startswith("Log file created at: ")
    assert lines[1].startswith("Running on machine: ")
    assert lines[2] == "Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg"
    assert GLOG.match(lines[3])
    return lines[3:]


def test_glog_log_dir_gets_glogs_files(tmp_path):
    """run_pascal.sh exports GLOG_log_dir: the INFO file holds every line, the WARNING
    file the warnings (here the fallback to the CPU) and nothing below."""
    solver = write_solver(tmp_path, "")
    logs = tmp_path / "logs"
    logs.mkdir()
    out = run_train(solver, train_env(GLOG_log_dir=str(logs)))
    assert out.returncode == 0, out.stderr
    info = glog_files(logs, "INFO")
    assert info == out.stderr.splitlines()
    assert any(l.endswith("Iteration 1, loss = " + l.rsplit("= ", 1)[-1]) for l in info)
    warnings = glog_files(logs, "WARNING")
    assert warnings and all(GLOG.match(l) and l.startswith("W") for l in warnings)
    assert warnings == [l for l in info if GLOG.match(l) and l.startswith("W")]
    assert not (logs / "caffelite.ERROR").exists()


def test_glog_environment_minloglevel_logtostderr_and_the_fatal_line(tmp_path):
    solver = write_solver(tmp_path, "")
    logs = tmp_path / "logs"
    logs.mkdir()
    quiet = run_train(solver, train_env(GLOG_minloglevel="1", GLOG_log_dir=str(logs),
                                        GLOG_logtostderr="1"))
    assert quiet.returncode == 0, quiet.stderr
    lines = [l for l in quiet.stderr.splitlines() if GLOG.match(l)]
    assert lines and all(l.startswith("W") for l in lines)
    assert os.listdir(logs) == []                 # GLOG_logtostderr: no files
    failed = run_train(tmp_path / "missing.prototxt", train_env(GLOG_log_dir=str(logs)))
    assert failed.returncode == 1
    assert "caffelite train: error: cannot read" in failed.stderr
    assert "] cannot read" not in failed.stderr   # the F line goes to the files only
    fatal = glog_files(logs, "FATAL")
    assert len(fatal) == 1 and fatal[0].startswith("F") and "cannot read" in fatal[0]
    assert glog_files(logs, "INFO")[-1] == fatal[0]


def test_glog_flags_on_either_side_of_the_verb(tmp_path, untrained):
    """caffe.bin takes glog's flags through gflags, before or after the verb; they win
    over the environment."""
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    logs = tmp_path / "logs"
    logs.mkdir()
    out = run("-minloglevel", "1", "test", "-model", str(net), "-weights", untrained,
              "-iterations", "1", "-DNAME=n", f"-log_dir={logs}", "-v=2",
              "-stderrthreshold", "0")
    assert out.returncode == 0, out.stderr
    assert not any(GLOG.match(l) and l.startswith("I") for l in out.stderr.splitlines())
    info = glog_files(logs, "INFO")       # weights without the net's layers: a warning
    assert info and all(l.startswith("W") for l in info if GLOG.match(l))
    assert glog_files(logs, "WARNING") == info
    quiet = run("test", "-logtostderr", "-model", str(net), "-weights", untrained,
                "-iterations", "1", "-DNAME=n", f"-log_dir={tmp_path / 'missing'}")
    assert quiet.returncode == 0 and "Batch 0" in quiet.stderr
    assert "COULD NOT CREATE" not in quiet.stderr        # no files were tried
    failing = run("test", "-model", str(net), "-weights", untrained, "-iterations", "1",
                  "-DNAME=n", f"-log_dir={tmp_path / 'missing'}")
    assert failing.returncode == 0 and "COULD NOT CREATE" in failing.stderr


def test_alsologtostderr_false_leaves_stderr_the_lines_from_stderrthreshold(tmp_path):
    """caffe.cpp turns alsologtostderr on before reading its flags; -alsologtostderr=false
    then leaves stderr glog's stderrthreshold and up (2, ERROR, by default) while the
    files get everything."""
    solver = write_solver(tmp_path, "solver_mode: GPU")     # a W line: no GPU here
    for flags, shown in ((["-alsologtostderr=false"], "EF"),
                         (["-noalsologtostderr", "-stderrthreshold", "1"], "WEF")):
        logs = tmp_path / f"logs{len(flags)}"
        logs.mkdir()
        out = run_train(solver, train_env(), f"-log_dir={logs}", *flags)
        assert out.returncode == 0, out.stderr
        info = glog_files(logs, "INFO")
        assert any(line.startswith("W") for line in info)      # the fallback to the CPU
        assert out.stderr.splitlines() == [line for line in info if line[:1] in shown]
        assert any("Iteration 2, loss = " in line for line in info)


def test_python_warnings_are_one_glog_line_each(tmp_path):
    """A numpy RuntimeWarning (an overflow here) is a W line naming where it was raised,
    not Python's two lines: Caffe's log parsers read the log of a diverging run."""
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "d" type: "DummyData" top: "d" dummy_data_param { '
                   'shape { dim: 2 } data_filler { type: "constant" value: 1e30 } } }\n'
                   'layer { name: "w" type: "Power" bottom: "d" top: "w" '
                   'power_param { power: 2 } }')
    weights = tmp_path / "net.caffemodel"
    import caffelite
    caffelite.Net(str(net), caffelite.TEST).save(str(weights))
    out = run("test", "-model", str(net), "-weights", str(weights), "-iterations", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    warned = [i for i, line in enumerate(lines) if "Warning" in line]
    assert warned, out.stderr
    for i in warned:
        assert GLOG.match(lines[i]) and lines[i].startswith("W") and \
            "RuntimeWarning: overflow" in lines[i]
        assert GLOG.match(lines[i + 1])           # no source line after it
    assert "Batch 0, w = inf" in out.stderr
    quiet = run("test", "-model", str(net), "-weights", str(weights), "-iterations", "1",
                "-minloglevel", "2")
    assert quiet.returncode == 0 and "Warning" not in quiet.stderr, quiet.stderr


def test_init_log_shows_everything_whatever_glogs_alsologtostderr_says():
    """The stderr threshold is the command line's (caffe.cpp's) rule; caffe.init_log()
    prints the whole log, as pycaffe's does."""
    import io
    from caffelite.log import logger, setup_logging
    stream = io.StringIO()
    try:
        setup_logging(stream=stream, environ={"GLOG_alsologtostderr": "0"})
        logger.info("an INFO line")
    finally:
        setup_logging()
    assert "] an INFO line" in stream.getvalue()


def test_a_name_that_is_not_utf8_reaches_glogs_files_as_its_bytes(tmp_path, untrained):
    """A list name read as bytes (MatRead's) in the stopping error: one error line on
    stderr, and the F line in glog's file holds the name's own bytes."""
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"caf\xe9.jpg\n")
    net = tmp_path / "net.prototxt"
    net.write_text(f'layer {{ name: "r" type: "MatRead" top: "d" mat_read_param {{ '
                   f'prefix: "{tmp_path}/" source: "{ids}" strip: 4 }} }}\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    out = run("test", "-model", str(net), "-weights", untrained, "-iterations", "1",
              f"-log_dir={logs}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "caffelite test: error: " in out.stderr and "MAT file not found" in out.stderr
    fatal = (logs / os.readlink(logs / "caffelite.FATAL")).read_bytes()
    assert b"caf\xe9_blob_0.mat" in fatal


def test_nan_prints_as_glibcs_ostream(tmp_path, untrained):
    """x86's NaN from an invalid operation has the sign bit set and glibc's ostream
    prints it "-nan" (Caffe's `loss = -nan` lines)."""
    from caffelite.log import ostream_g
    with np.errstate(invalid="ignore"):
        quiet_nan = np.float32(np.inf) - np.float32(np.inf)
    assert np.signbit(quiet_nan) and ostream_g(quiet_nan) == "-nan"
    assert ostream_g(np.float32(np.nan)) == "nan" and ostream_g(-np.inf) == "-inf"
    assert ostream_g(np.float32(0.1)) == "0.1" and ostream_g(1e-5) == "1e-05"
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "d" type: "DummyData" top: "d" dummy_data_param { '
                   'shape { dim: 1 } data_filler { type: "constant" value: -1 } } }\n'
                   'layer { name: "w" type: "Power" bottom: "d" top: "w" '
                   'power_param { power: 0.5 } }')
    out = run("test", "-model", str(net), "-weights", untrained, "-iterations", "2")
    assert out.returncode == 0, out.stderr
    assert "Batch 1, w = -nan" in out.stderr and "] w = -nan" in out.stderr


def test_flags_before_the_verb_and_glog_flags_of_every_verb():
    from caffelite.cli import build_parser, gflags_style
    assert gflags_style(["--tf32", "train", "-solver", "s"]) == \
        ["train", "--tf32", "--solver", "s"]
    assert gflags_style(["-nologtostderr", "-log_dir", "d", "test", "-model", "m"]) == \
        ["test", "--nologtostderr", "--log_dir", "d", "--model", "m"]
    args = build_parser().parse_args(gflags_style(
        ["-log_dir=x", "device_query", "-gpu", "0", "-logtostderr", "-minloglevel", "1"]))
    assert (args.command, args.log_dir, args.logtostderr, args.minloglevel) == \
        ("device_query", "x", "true", "1")
    args = build_parser().parse_args(gflags_style(["test", "-model", "m", "-nologtostderr"]))
    assert args.logtostderr == "false"


def test_upgrade_exit_status_and_lines_are_the_tools(tmp_path):
    """upgrade_net_proto_text and upgrade_solver_proto_text: a file already in the latest
    format is said so (and written out); an upgrade with problems is written too, then
    the tool exits with 1."""
    latest = tmp_path / "v2.prototxt"
    latest.write_text(NET.replace("${NAME}", "n"))
    out = run("upgrade", str(latest), str(tmp_path / "out.prototxt"))
    assert out.returncode == 0, out.stderr
    assert f"] File already in latest proto format: {latest}" in out.stderr
    solver = tmp_path / "s.prototxt"
    solver.write_text('net: "x"\nbase_lr: 0.1\ntype: "Adam"\n')
    out = run("upgrade", "--solver", str(solver), str(tmp_path / "s2.prototxt"))
    assert out.returncode == 0 and f"latest proto format: {solver}" in out.stderr
    v0 = tmp_path / "v0.prototxt"
    v0.write_text('input: "d" input_dim: 1 input_dim: 1 input_dim: 2 input_dim: 2\n'
                  'layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "d" '
                  'top: "r" }\n')
    out = run("upgrade", str(v0), str(tmp_path / "v0_up.prototxt"))
    assert out.returncode == 1
    lines = [l.split("] ", 1)[-1] for l in out.stderr.splitlines() if l.startswith("E")]
    assert lines == ["Unknown parameter num_output for layer type relu",
                     "Warning: had one or more problems upgrading V0NetParameter to "
                     "NetParameter (see above); continuing anyway.",
                     "Encountered error(s) while upgrading prototxt; see details above."]
    assert 'type: "ReLU"' in (tmp_path / "v0_up.prototxt").read_text()


def test_eval_leaves_out_the_label_given_by_ignore(tmp_path):
    """``caffelite eval --ignore 254``: MyVOCevalseg's ignore label as a flag; the
    confusion and mean IoU are tests/test_evaluate.py's hand count, where the pixels of
    ground truth 254 are dropped. Without the flag 254 is an ordinary label, outside
    [0, 2): a one-line error."""
    import json
    from PIL import Image
    from test_evaluate import IGNORE_254_GT, IGNORE_254_PRED, _ignore_254_expected
    confusion, iou, miou = _ignore_254_expected()
    for name, label in (("gt", IGNORE_254_GT), ("pred", IGNORE_254_PRED)):
        (tmp_path / name).mkdir()
        Image.fromarray(label).save(tmp_path / name / "a.png")
    (tmp_path / "ids.txt").write_text("a\n")
    args = ["eval", "--gt", str(tmp_path / "gt"), "--list", str(tmp_path / "ids.txt"),
            "--pred", str(tmp_path / "pred"), "--num-labels", "2"]
    out = run(*args, "--ignore", "254", "--json", str(tmp_path / "scores.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "scores.json").read_text())
    assert data["confusion"] == confusion.tolist()
    assert data["miou_percent"] == pytest.approx(miou, rel=1e-15)
    assert "Average accuracy: %.3f%%" % miou in out.stdout
    out = run(*args)
    assert out.returncode == 1
    assert "ground-truth label 254 is outside [0, 2)" in out.stderr
