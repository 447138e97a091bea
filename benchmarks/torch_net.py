"""The same net written in PyTorch, built automatically from a caffelite ``Net``.

``TorchNet(net)`` walks ``net.layers`` with ``net.bottom_names`` / ``net.top_names`` and
gives every layer its ``torch.nn.functional`` equivalent, with the weights copied from the
caffelite net (parameters shared by name, as in Caffe, are one torch ``Parameter``).  It is
the PyTorch side of ``benchmarks/gpu_train.py`` and an independent oracle for whole nets
in the tests: nothing of caffelite's arithmetic is used, only the layer parameters, the
weights and the blob shapes (Interp resizes to caffelite's top size; every layer's output
shape is checked against caffelite's top shape, so e.g. a Caffe ceil-mode pooling size
that torch's ``ceil_mode`` would not reproduce stops with an error naming the layer).

Layer types: Input, Convolution (stride, pad, dilation, groups, bias), Pooling (MAX/AVE,
global, Caffe's ceil mode with the clipped last window), ReLU (negative_slope), Dropout,
InnerProduct, Interp (align-corners bilinear, negative pads crop), Eltwise SUM (coeff) /
MAX / PROD, Concat, Split, BatchNorm (stored or batch statistics), Scale, Bias, Softmax,
SoftmaxWithLoss (ignore_label, normalization), Silence.  Anything else raises
``TorchNetError`` naming the layer, unless its type is in ``skip_types`` (metrics and
writers such as SegAccuracy or MatWrite whose tops nothing reads).

torch is a benchmark/test extra (``pip install torch``); caffelite never imports it.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from caffelite.proto import caffe_pb2

TRAIN, TEST = 0, 1
_P = caffe_pb2.PoolingParameter
_E = caffe_pb2.EltwiseParameter
_L = caffe_pb2.LossParameter
LOSS_TYPES = {"SoftmaxWithLoss"}
LOG_FLT_MIN = math.log(float(np.finfo(np.float32).tiny))


class TorchNetError(ValueError):
    pass


def _pair(repeated, single_h, single_w, has_h, default):
    """Caffe's (h, w) from a repeated field (one value for both, or h then w) or the
    explicit ``*_h`` / ``*_w`` fields."""
    if has_h:
        return int(single_h), int(single_w)
    values = list(repeated)
    if not values:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    return int(values[0]), int(values[1])


class _Step:
    """One caffelite layer: its parameter, blob names, caffelite top shapes and the
    function computing the tops from the bottoms."""

    def __init__(self, lp, bottoms, tops, top_shapes, run, propagate, loss_weights):
        self.lp, self.name, self.type = lp, lp.name, lp.type
        self.bottoms, self.tops, self.top_shapes = bottoms, tops, top_shapes
        self.run, self.propagate, self.loss_weights = run, propagate, loss_weights


class TorchNet(torch.nn.Module):
    """``TorchNet(net, device="cpu")``; ``forward(inputs)`` → ``(loss, blobs)``.

    ``inputs`` maps the net's Input tops to tensors (or arrays) of caffelite's shapes.
    ``loss`` is Σ loss_weight·sum(top) over loss tops (a 0-d tensor, 0 when there are
    none); ``blobs`` holds the net outputs (tops nothing reads), or every blob with
    ``keep="all"`` (or the names in a list ``keep``).  Dropout in TRAIN draws torch's
    own mask unless ``dropout_masks[layer name]`` gives Caffe's 0/1 keep mask.
    ``interp="caffe"`` resizes with Caffe's float32 coordinates also in float64 nets
    (``F.interpolate`` takes double ones there), for exact float64 comparisons.
    ``inplace=False`` keeps Caffe's in-place ReLUs out of place.
    """

    def __init__(self, net, device="cpu", skip_types=(), interp="torch", inplace=True):
        super().__init__()
        self.inplace = inplace
        if interp not in ("torch", "caffe"):
            raise ValueError(f"interp must be 'torch' or 'caffe', got {interp!r}")
        self.interp = interp
        self.device = torch.device(device)
        self.phase = net.phase
        self.net_name = net.name
        self.params_list = torch.nn.ParameterList()
        self._param_index = {}       # (layer name, blob index) -> index in params_list
        self._param_lr = []          # per torch parameter: (lr_mult, decay_mult)
        self._shared = {}            # ParamSpec name -> index in params_list
        self.buffers_of = {}         # BatchNorm layer name -> [mean, var, factor] tensors
        self.steps = self._net_input_steps(net)
        for lp, layer, tops in zip(net.layer_params, net.layers, net.top_blobs):
            if lp.type in skip_types:
                continue
            shapes = [tuple(t.shape) for t in tops]
            self.steps.append(self._make_step(lp, layer, net, shapes))
        self._check_skipped_tops(net, skip_types)
        self._plan_frees()

    # ------------------------------------------------------------------ building
    @staticmethod
    def _net_input_steps(net):
        """An Input step for the blobs of ``input:`` fields (net inputs that no layer
        produces, as in the fork)."""
        from_layers = {t for lp in net.layer_params if lp.type == "Input" for t in lp.top}
        names = [n for n in net.inputs if n not in from_layers]
        if not names:
            return []
        lp = caffe_pb2.LayerParameter(name="input", type="Input", top=names)
        shapes = [tuple(net.blobs[n].shape) for n in names]
        return [_Step(lp, [], names, shapes, None, [], [0.0] * len(names))]

    def error(self, lp, message):
        return TorchNetError(f"net '{self.net_name}', layer '{lp.name}' ({lp.type}): {message}")

    def _make_step(self, lp, layer, net, shapes):
        build = _BUILDERS.get(lp.type)
        if build is None:
            raise self.error(lp, f"no PyTorch version of this layer type in torch_net "
                                 f"(supported: {', '.join(sorted(_BUILDERS))})")
        run = build(self, lp, layer, net, shapes)
        propagate = ([bool(v) for v in lp.propagate_down] if len(lp.propagate_down)
                     else [True] * len(lp.bottom))
        # Loss layers without a top get one (Caffe's AutoTopBlobs): caffelite's tops.
        # (net.top_names names them all "(automatic)"; keep them apart per layer)
        tops = list(lp.top) + [f"(automatic {lp.name} {j})"
                               for j in range(len(lp.top), len(shapes))]
        weights = list(lp.loss_weight)
        if not weights:
            weights = [0.0] * len(tops)
            if lp.type in LOSS_TYPES and weights:
                weights[0] = 1.0
        return _Step(lp, net.bottom_names[lp.name], tops, shapes, run, propagate, weights)

    def _check_skipped_tops(self, net, skip_types):
        produced = set()
        for step in self.steps:
            for b in step.bottoms:
                if b not in produced:
                    raise self.error(step.lp, f"bottom '{b}' comes from a skipped layer "
                                              f"(skip_types {tuple(skip_types)})")
            produced.update(step.tops)

    def _plan_frees(self):
        """After which step each blob can be dropped (its last reader), so that, as in
        a PyTorch model, intermediate tensors die when no longer needed."""
        last_read, written = {}, set()
        for i, step in enumerate(self.steps):
            for b in step.bottoms:
                last_read[b] = i
            written.update(step.tops)
        self.outputs = sorted(written - set(last_read))
        self._free_after = [[] for _ in self.steps]
        for name, i in last_read.items():
            if name not in self.outputs:
                self._free_after[i].append(name)

    def param(self, lp, layer, index):
        """The torch Parameter of ``layer.blobs[index]`` (shared by ParamSpec name)."""
        spec = lp.param[index] if index < len(lp.param) else caffe_pb2.ParamSpec()
        if spec.name and spec.name in self._shared:
            k = self._shared[spec.name]
            if tuple(self.params_list[k].shape) != tuple(layer.blobs[index].shape):
                raise self.error(lp, f"shared param '{spec.name}' has another shape")
            if spec.lr_mult != 0:
                self.params_list[k].requires_grad_(True)
        else:
            k = len(self.params_list)
            data = torch.tensor(np.array(layer.blobs[index].data), device=self.device)
            self.params_list.append(torch.nn.Parameter(data, requires_grad=spec.lr_mult != 0))
            self._param_lr.append((spec.lr_mult, spec.decay_mult))
            if spec.name:
                self._shared[spec.name] = k
        self._param_index[(lp.name, index)] = k
        w = self.params_list[k]
        # Caffe's per-layer param_propagate_down: lr_mult 0 in this layer, no gradient
        # from this use (even if another layer sharing the blob learns it).
        return (lambda: w) if spec.lr_mult != 0 else (lambda: w.detach())

    def parameter_of(self, layer_name, index):
        """The torch Parameter holding caffelite ``net.params[layer_name][index]``."""
        return self.params_list[self._param_index[(layer_name, index)]]

    def tensor(self, array, dtype=None):
        if isinstance(array, torch.Tensor):
            return array.to(device=self.device, dtype=dtype)
        return torch.as_tensor(np.asarray(array), device=self.device, dtype=dtype)

    # ------------------------------------------------------------------ running
    def forward(self, inputs, keep=None, dropout_masks=None):
        blobs = {}
        keep_all = keep == "all"
        keep = set(keep or ()) if not keep_all else set()
        masks = dropout_masks or {}
        loss = None
        for i, step in enumerate(self.steps):
            if step.type == "Input":
                tops = [self._input(step, inputs, name) for name in step.tops]
            else:
                xs = [blobs[b] if p else blobs[b].detach()
                      for b, p in zip(step.bottoms, step.propagate)]
                try:
                    tops = step.run(xs, masks.get(step.name))
                except (RuntimeError, ValueError) as e:
                    raise self.error(step.lp, str(e)) from e
            for name, shape, t in zip(step.tops, step.top_shapes, tops):
                if tuple(t.shape) != shape:
                    raise self.error(step.lp, f"PyTorch gives top '{name}' the shape "
                                              f"{tuple(t.shape)}, caffelite {shape}")
                blobs[name] = t
            for t, w in zip(tops, step.loss_weights):
                if w:
                    term = w * t.sum()
                    loss = term if loss is None else loss + term
            if not keep_all:
                for name in self._free_after[i]:
                    if name not in keep:
                        blobs.pop(name, None)
        if loss is None:
            loss = torch.zeros((), device=self.device)
        return loss, blobs

    def _input(self, step, inputs, name):
        if name not in inputs:
            raise self.error(step.lp, f"no value given for input blob '{name}'")
        return self.tensor(inputs[name])

    # ------------------------------------------------------------------ training
    def sgd(self, base_lr, momentum, weight_decay):
        """torch SGD with Caffe's per-parameter lr_mult/decay_mult, one parameter group
        per (lr_mult, decay_mult) pair.  At a constant rate Caffe's v ← m·v + lr·(g +
        wd·w), w ← w - v is torch's b ← m·b + g + wd·w, w ← w - lr·b (v = lr·b)."""
        groups = {}
        for p, mults in zip(self.params_list, self._param_lr):
            if p.requires_grad:
                groups.setdefault(mults, []).append(p)
        return torch.optim.SGD(
            [{"params": params, "lr": base_lr * lr_mult, "weight_decay": weight_decay * decay}
             for (lr_mult, decay), params in groups.items()], lr=base_lr, momentum=momentum)


# ---------------------------------------------------------------------- layers
def _build_input(tn, lp, layer, net, shapes):
    return None


def _build_convolution(tn, lp, layer, net, shapes):
    p = lp.convolution_param
    if p.axis != 1 or len(shapes[0]) != 4:
        raise tn.error(lp, "only 2-D convolution over axis 1 is supported")
    kernel = _pair(p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"), 0)
    pad = _pair(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h"), 0)
    stride = _pair(p.stride, p.stride_h, p.stride_w, p.HasField("stride_h"), 1)
    dilation = _pair(p.dilation, 0, 0, False, 1)
    weight = tn.param(lp, layer, 0)
    if tuple(layer.blobs[0].shape[2:]) != kernel:
        raise tn.error(lp, f"weights {layer.blobs[0].shape} do not match kernel {kernel}")
    bias = tn.param(lp, layer, 1) if p.bias_term else (lambda: None)
    group = int(p.group)

    def run(xs, _):
        return [F.conv2d(xs[0], weight(), bias(), stride, pad, dilation, group)]
    return run


def _build_pooling(tn, lp, layer, net, shapes):
    p = lp.pooling_param
    if p.pool not in (_P.MAX, _P.AVE):
        raise tn.error(lp, "only pool: MAX and AVE are supported")
    if len(lp.top) != 1:
        raise tn.error(lp, "the argmax-mask second top is not supported")
    ceil = not p.HasField("round_mode") or p.round_mode == _P.CEIL
    bottom_shape = net.blobs[lp.bottom[0]].shape
    if p.global_pooling:
        kernel, pad, stride = tuple(bottom_shape[2:]), (0, 0), (1, 1)
    else:
        kernel = ((p.kernel_h, p.kernel_w) if p.HasField("kernel_h")
                  else (p.kernel_size, p.kernel_size))
        pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
    if p.pool == _P.MAX:
        def run(xs, _):
            return [F.max_pool2d(xs[0], kernel, stride, pad, ceil_mode=ceil)]
    else:
        # Caffe divides by the window clipped to the padded input (pads count, the
        # ceil-mode overhang beyond them does not): torch's count_include_pad rule.
        def run(xs, _):
            return [F.avg_pool2d(xs[0], kernel, stride, pad, ceil_mode=ceil,
                                 count_include_pad=True)]
    return run


def _build_relu(tn, lp, layer, net, shapes):
    slope = float(lp.relu_param.negative_slope)
    # In place where Caffe is (top == bottom), as torchvision's ReLU(inplace=True);
    # never on a leaf that requires grad (an input given for its gradient).
    inplace = tn.inplace and lp.top[0] == lp.bottom[0]

    def run(xs, _):
        x = xs[0]
        now = inplace and not (x.is_leaf and x.requires_grad)
        return [F.leaky_relu(x, slope, inplace=now) if slope else F.relu(x, inplace=now)]
    return run


def _build_dropout(tn, lp, layer, net, shapes):
    ratio = float(lp.dropout_param.dropout_ratio)
    if tn.phase != TRAIN:
        return lambda xs, _: [xs[0]]
    scale = 1.0 / (1.0 - float(np.float32(ratio)))

    def run(xs, mask):
        if mask is None:
            return [F.dropout(xs[0], ratio, training=True)]
        m = tn.tensor(mask, xs[0].dtype)
        return [xs[0] * m * scale]
    return run


def _build_inner_product(tn, lp, layer, net, shapes):
    p = lp.inner_product_param
    axis = p.axis % len(net.blobs[lp.bottom[0]].shape)
    weight = tn.param(lp, layer, 0)
    bias = tn.param(lp, layer, 1) if p.bias_term else (lambda: None)
    transpose = p.transpose

    def run(xs, _):
        x = xs[0]
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        w = weight()
        y = F.linear(flat, w.t() if transpose else w, bias())
        return [y.reshape(*x.shape[:axis], y.shape[1])]
    return run


def _build_interp(tn, lp, layer, net, shapes):
    p = lp.interp_param
    if p.pad_beg > 0 or p.pad_end > 0:
        raise tn.error(lp, "positive pads are not supported (Interp only crops)")
    beg, end = -p.pad_beg, p.pad_end
    size = tuple(shapes[0][2:])

    def run(xs, _):
        x = xs[0]
        h, w = x.shape[2:]
        x = x[:, :, beg:h + end, beg:w + end]
        if tuple(x.shape[2:]) == size:
            return [x]
        if tn.interp == "caffe":
            return [_caffe_bilinear(x, size)]
        return [F.interpolate(x, size=size, mode="bilinear", align_corners=True)]
    return run


def _caffe_axis(n_in, n_out, device):
    """Caffe's float32 align-corners source rows: ratio (n_in-1)/(n_out-1) and
    positions ratio·i in float32, the lower row, the upper one (the same at the last
    row) and the float32 fraction."""
    ratio = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    pos = ratio * np.arange(n_out, dtype=np.float32)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = pos - low.astype(np.float32)
    return (torch.as_tensor(low, device=device), torch.as_tensor(high, device=device),
            torch.as_tensor(frac.astype(np.float64), device=device))


def _caffe_bilinear(x, size):
    """Bilinear align-corners resize with Caffe's float32 coordinates (what
    F.interpolate computes for float32 tensors; for float64 it takes double ones)."""
    y0, y1, fy = _caffe_axis(x.shape[2], size[0], x.device)
    x0, x1, fx = _caffe_axis(x.shape[3], size[1], x.device)
    fy, fx = fy.to(x.dtype)[:, None], fx.to(x.dtype)
    top, bottom = x[:, :, y0, :], x[:, :, y1, :]
    upper = (1 - fx) * top[..., x0] + fx * top[..., x1]
    lower = (1 - fx) * bottom[..., x0] + fx * bottom[..., x1]
    return (1 - fy) * upper + fy * lower


def _build_eltwise(tn, lp, layer, net, shapes):
    p = lp.eltwise_param
    if p.operation == _E.SUM:
        coeff = list(p.coeff) or [1.0] * len(lp.bottom)
        if len(coeff) != len(lp.bottom):
            raise tn.error(lp, "needs one coeff per bottom")

        def run(xs, _):
            y = xs[0] * coeff[0] if coeff[0] != 1 else xs[0]
            for c, x in zip(coeff[1:], xs[1:]):
                y = y + (x * c if c != 1 else x)
            return [y]
    elif p.operation == _E.PROD:
        def run(xs, _):
            y = xs[0]
            for x in xs[1:]:
                y = y * x
            return [y]
    elif p.operation == _E.MAX:
        # torch.max over a stacked axis routes the gradient to the first maximum,
        # Caffe's CPU rule (ties go to the earlier bottom).
        def run(xs, _):
            return [torch.stack(xs).max(dim=0).values]
    else:
        raise tn.error(lp, f"unknown operation {p.operation}")
    return run


def _build_concat(tn, lp, layer, net, shapes):
    p = lp.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    return lambda xs, _: [torch.cat(xs, dim=axis)]


def _build_split(tn, lp, layer, net, shapes):
    n = len(lp.top)
    return lambda xs, _: [xs[0]] * n


def _build_silence(tn, lp, layer, net, shapes):
    return lambda xs, _: []


def _channel_view(lp, tn, bottom_shape, axis, param_shape):
    """Shape that broadcasts a Scale/Bias factor (parameter or second bottom) of
    ``param_shape`` against the bottom from ``axis`` on."""
    axis = axis % len(bottom_shape) if bottom_shape else 0
    n = len(param_shape)
    if tuple(bottom_shape[axis:axis + n]) != tuple(param_shape):
        raise tn.error(lp, f"parameter {tuple(param_shape)} does not match bottom "
                           f"{tuple(bottom_shape)} at axis {axis}")
    return (1,) * axis + tuple(param_shape) + (1,) * (len(bottom_shape) - axis - n)


def _build_scale(tn, lp, layer, net, shapes):
    p = lp.scale_param
    bottom_shape = net.blobs[lp.bottom[0]].shape
    if len(lp.bottom) == 2:
        factor_shape = net.blobs[lp.bottom[1]].shape
        view = _channel_view(lp, tn, bottom_shape, p.axis, factor_shape)
        scale = None
    else:
        view = _channel_view(lp, tn, bottom_shape, p.axis, layer.blobs[0].shape)
        scale = tn.param(lp, layer, 0)
    bias_index = 1 if len(lp.bottom) == 1 else 0
    bias = tn.param(lp, layer, bias_index) if p.bias_term else None

    def run(xs, _):
        s = xs[1] if scale is None else scale()
        y = xs[0] * s.reshape(view)
        return [y + bias().reshape(view) if bias is not None else y]
    return run


def _build_bias(tn, lp, layer, net, shapes):
    p = lp.bias_param
    bottom_shape = net.blobs[lp.bottom[0]].shape
    if len(lp.bottom) == 2:
        view = _channel_view(lp, tn, bottom_shape, p.axis, net.blobs[lp.bottom[1]].shape)
        bias = None
    else:
        view = _channel_view(lp, tn, bottom_shape, p.axis, layer.blobs[0].shape)
        bias = tn.param(lp, layer, 0)

    def run(xs, _):
        b = xs[1] if bias is None else bias()
        return [xs[0] + b.reshape(view)]
    return run


def _build_batch_norm(tn, lp, layer, net, shapes):
    p = lp.batch_norm_param
    use_global = p.use_global_stats if p.HasField("use_global_stats") else tn.phase == TEST
    eps, fraction = float(p.eps), float(p.moving_average_fraction)
    stats = [tn.tensor(np.array(b.data)) for b in layer.blobs]
    tn.buffers_of[lp.name] = stats
    channels = stats[0].shape[0]

    def per_channel(v, x):
        return v.reshape((1, channels) + (1,) * (x.dim() - 2))

    if use_global:
        # The stored statistics are sums over a scale factor (0 → statistics 0); they
        # do not change, so eval-mode batch_norm gets them divided once.
        stored = float(layer.blobs[2].data[0])
        factor = 0.0 if stored == 0 else 1.0 / stored
        mean, var = stats[0] * factor, stats[1] * factor
        return lambda xs, _: [F.batch_norm(xs[0], mean, var, training=False, eps=eps)]

    def run(xs, _):
        x = xs[0]
        axes = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=axes)
        var = ((x - per_channel(mean, x)) ** 2).mean(dim=axes)
        _update_running(stats, mean.detach(), var.detach(), x.numel() // channels, fraction)
        return [(x - per_channel(mean, x)) / torch.sqrt(per_channel(var, x) + eps)]
    return run


def _update_running(stats, mean, var, m, fraction):
    """Caffe's running sums: s ← fraction·s + 1, mean/var sums ← batch + fraction·sum,
    the variance with the m/(m-1) unbiasing factor."""
    with torch.no_grad():
        stats[2].mul_(fraction).add_(1)
        stats[0].mul_(fraction).add_(mean)
        stats[1].mul_(fraction).add_(var * (m / (m - 1) if m > 1 else 1))


def _build_softmax(tn, lp, layer, net, shapes):
    axis = lp.softmax_param.axis
    return lambda xs, _: [F.softmax(xs[0], dim=axis)]


def _build_softmax_loss(tn, lp, layer, net, shapes):
    if lp.HasField("softmaxloss_param"):
        raise tn.error(lp, "DeepLab v1's softmaxloss_param loss is not supported")
    lossp = lp.loss_param
    ignore = int(lossp.ignore_label) if lossp.HasField("ignore_label") else None
    if lossp.HasField("normalization"):
        mode = lossp.normalization
    elif lossp.HasField("normalize"):
        mode = _L.VALID if lossp.normalize else _L.BATCH_SIZE
    else:
        mode = _L.VALID
    ndim = len(net.blobs[lp.bottom[0]].shape)
    axis = lp.softmax_param.axis % ndim

    def run(xs, _):
        scores, labels = xs
        logp = F.log_softmax(scores, dim=axis)
        c = scores.shape[axis]
        outer = math.prod(scores.shape[:axis])
        flat = logp.movedim(axis, -1).reshape(-1, c)
        lab = labels.detach().reshape(-1).long()      # C's truncating cast
        valid = lab != ignore if ignore is not None else torch.ones_like(lab, dtype=bool)
        picked = flat.gather(1, torch.where(valid, lab, 0)[:, None])[:, 0]
        # Caffe's loss is -log(max(p, FLT_MIN)) (at most 87.3 per position) while its
        # gradient stays p - onehot: clamp the value only.
        clamped = picked.clamp(min=LOG_FLT_MIN)
        picked = picked + (clamped - picked).detach()
        total = -torch.where(valid, picked, torch.zeros_like(picked)).sum()
        if mode == _L.VALID:        # a device count: no host sync
            norm = valid.sum().to(scores.dtype).clamp(min=1.0)
        else:
            norm = float(max(1, {_L.FULL: lab.numel(), _L.BATCH_SIZE: outer,
                                 _L.NONE: 1}[mode]))
        return [total / norm]
    return run


_BUILDERS = {
    "Input": _build_input,
    "Convolution": _build_convolution,
    "Pooling": _build_pooling,
    "ReLU": _build_relu,
    "Dropout": _build_dropout,
    "InnerProduct": _build_inner_product,
    "Interp": _build_interp,
    "Eltwise": _build_eltwise,
    "Concat": _build_concat,
    "Split": _build_split,
    "Silence": _build_silence,
    "Scale": _build_scale,
    "Bias": _build_bias,
    "BatchNorm": _build_batch_norm,
    "Softmax": _build_softmax,
    "SoftmaxWithLoss": _build_softmax_loss,
}
