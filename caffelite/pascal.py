"""``caffelite pascal``: the DeepLab kit's ``run_pascal.sh`` (train, test, train2,
test2), its ``run_densecrf.sh`` and its MATLAB evaluation as one command.

    caffelite pascal EXPER_DIR --net NET_ID --data-root DIR [--num-labels 21]
        [--train-set-suffix _aug] [--steps train,test,train2,test2,crf,eval]
        [--steps ...,crf_search,crf,eval [--search-bi-w 3:6 ...]]
        [--force] [-D NAME=VALUE ...] [--gpu N]

``EXPER_DIR`` is the kit's ``${EXP}`` folder (e.g. ``exper/voc12``): ``EXP`` is its
name and every step runs in its parent folder, as run_pascal.sh runs in ``exper/``,
so the relative paths of the kit's prototxts (``${EXP}/list/...``) resolve as there.

Layout (as in the kit)::

    ${EXP}/config/${NET_ID}/{train,test,solver,solver2}.prototxt   templates
    ${EXP}/config/${NET_ID}/train_${TRAIN_SET}.prototxt ...          expanded copies
    ${EXP}/list/{train_aug,trainval_aug,val,test}.txt, val_id.txt ...
    ${EXP}/model/${NET_ID}/init.caffemodel (init2, test, test2)      optional
    ${EXP}/model/${NET_ID}/train_iter_N.caffemodel, train2_iter_N    snapshots
    ${EXP}/features/${NET_ID}/${TEST_SET}/fc8/<id>_blob_0.mat        test #1
    ${EXP}/features2/${NET_ID}/${TEST_SET}/{fc8,crf}/                test #2
    ${EXP}/log/${NET_ID}/<step>.<date>-<time>.log                    one per step
    ${EXP}/res/<features|features2>/${NET_ID}/${TEST_SET}/fc8/
        post_none/                    palette PNGs + results.json/.txt (raw scores)
        post_densecrf_W4_XStd49_RStd5_PosW3_PosXStd3/  CRF labels + results.json/.txt

Templates are expanded like ``sed "$(eval echo $(cat sub.sed))"``: every sub.sed
variable is defined (unset ones empty; the ones an earlier section of run_pascal.sh
leaves set, e.g. TRAIN_SET during test #1, are set as if every earlier section ran)
and ``-D NAME=VALUE`` overrides or adds variables (e.g. ``-D BATCH_SIZE=10``; a
placeholder that is neither is an error naming it, where sed would leave it for
Caffe's parser to trip over).  ``-D TRAIN_SET_STRONG=... [-D TRAIN_SET_WEAK_LEN=N]``
writes the kit's ``comm -3`` weak list; without it only the name TRAIN_SET_WEAK is
set (the kit would run ``comm`` on a missing ``list/.txt``).  Without ``--gpu`` the
steps run on the CPU (the kit always passes ``--gpu=${DEV_ID}``).

Steps (each logs to its own file; a finished step is skipped unless ``--force``):

* ``train``: TRAIN_SET=train${SUFFIX}; ``--weights init.caffemodel`` if it exists.
  Finished when the solver's final snapshot ``<prefix>_iter_<max_iter>.caffemodel``
  exists. ``<prefix>_configs.json`` beside it records the expanded train net and solver
  it was made with (SHA-256 of what they say, comments and spacing aside); when they
  differ now (an edited template or ``-D`` value), a warning says so, and ``--force``
  trains again.
* ``test``: for each of ``--test-sets`` (val): model ``test.caffemodel``, else the
  newest ``train_iter_*`` snapshot, as the kit's ``ls -t | head -n 1`` (copies and
  restores change mtimes: a warning says when another snapshot has a higher
  iteration); iterations = ``wc -l < list/${TEST_SET}.txt`` (a last line without a
  newline is not tested, as in the kit: a warning says so); folders fc8, fc9 and
  seg_score made as the kit makes them.  Finished when every file the net's MatWrite
  layers will write exists and is newer than the model, and
  ``${FEATURE_DIR}/${TEST_SET}/test_configs.json``, when there, records the same
  expanded test net (else it tests again, saying why).
* ``train2``: TRAIN_SET=trainval${SUFFIX}, ``solver2``; weights ``init2.caffemodel``
  else the newest ``train_iter_*``.
* ``test2``: for each of ``--test2-sets`` (val,test): ``test2.caffemodel`` else the
  newest ``train2_iter_*``; FEATURE_DIR=${EXP}/features2/${NET_ID}.
* ``crf_search`` (only when named in ``--steps``): the CRF's cross-validation of the
  DeepLab papers (``caffelite crf_search``) on the first ``--search-images`` (100) images
  of ``--eval-set`` from the latest stage's fc8 features: every combination of
  ``--search-bi-w`` (3:6), ``--search-bi-xy-std`` (30:10:100) and
  ``--search-bi-rgb-std`` (3:6) with the other ``--crf-*`` values, scored by mean IoU,
  into ``res/.../crf_search.json``. From then on the crf and eval steps take its best
  parameters for every ``--crf-*`` flag not given on the command line. Finished when
  the JSON is newer than those features and holds the same images and grid.
* ``crf``: the dense CRF (``caffelite.crf``) on the fc8 features of every test set of
  the latest stage (features2 when test2 ran or has features, else features), images
  from the lists, into ``res/.../post_densecrf_...``.  Finished when every label PNG
  exists and is newer than its features, and ``crf_params.json`` beside them records
  the same parameters (the folder's name leaves out max_iter).
* ``eval``: for ``--eval-set`` (val): MyVOCevalseg's numbers (``caffelite.evaluate``)
  of the raw fc8 features of each stage that has them, and of the CRF labels for
  the current CRF parameters when they exist.  Finished when ``results.json`` is
  newer than its inputs.  The reports are printed at the end.

Ground truth is ``DATA_ROOT/SegmentationClass/<id>.png``, where the release's MATLAB
evaluation (GetVOCopts' ``seg.clsimgpath``) reads it, when that file exists; else the
list's second column under DATA_ROOT (the kit's SegmentationClassAug); ``--gt DIR``
overrides both.
"""
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import time

from . import backend
from .evaluate import EvalItem, EvalResult, evaluate, read_list
from .io import prototxt
from .io.caffemodel import write_atomically
from .log import GlogFormatter, logger

STEPS = ("train", "test", "train2", "test2", "crf_search", "crf", "eval")
# crf_search runs only when asked for (it scores dozens of parameter sets per image).
DEFAULT_STEPS = tuple(s for s in STEPS if s != "crf_search")
# The DeepLab-v2 paper's first search round (MATLAB ranges), pos_w = pos_xy_std = 3.
SEARCH_DEFAULTS = {"bi_w": "3:6", "bi_xy_std": "30:10:100", "bi_rgb_std": "3:6"}
SEARCH_IMAGES = 100

# Every variable of the kit's sub.sed (the v2 kit's, plus EXP2 of one copy and
# SNAPSHOT of one variant); unset ones expand to the empty string.
SUB_SED_VARIABLES = (
    "DATA_ROOT", "DATA_ROOT1", "EXP", "EXP1", "EXP2", "TRAIN_SET", "TRAIN_SET1",
    "TRAIN_SET1_WEAK", "TRAIN_SET1_STRONG", "TEST_SET", "NET_ID", "FEATURE_DIR",
    "NUM_LABELS", "NUM_LABELS1", "NUM_LABELS_UNION", "BG_BIAS", "FG_BIAS",
    "TRAIN_SET_STRONG", "TRAIN_SET_WEAK", "BATCH_SIZE", "TEST_SET_PREFIX", "TRAIN_STEP",
    "SNAPSHOT")

# Beside a crf step's labels: the parameters that made them (the folder's name leaves
# out max_iter).
CRF_RECORD = "crf_params.json"
# beside a training's snapshots (<snapshot_prefix><this>) and a test's features: the
# digests of the expanded configs they were made with
TRAIN_RECORD = "_configs.json"
TEST_RECORD = "test_configs.json"

# run_densecrf.sh's example values (DeepLab-LargeFOV), in its names.
CRF_DEFAULTS = {"max_iter": 10, "bi_w": 4, "bi_xy_std": 49, "bi_rgb_std": 5, "pos_w": 3,
                "pos_xy_std": 3}


class PipelineError(RuntimeError):
    pass


def _num(value):
    """A CRF parameter as the kit's folder names print it (``%d`` for integers)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def crf_folder(params):
    """``post_densecrf_W<bi_w>_XStd<bi_xy>_RStd<bi_rgb>_PosW<pos_w>_PosXStd<pos_xy>``."""
    return (f"post_densecrf_W{_num(params['bi_w'])}_XStd{_num(params['bi_xy_std'])}"
            f"_RStd{_num(params['bi_rgb_std'])}_PosW{_num(params['pos_w'])}"
            f"_PosXStd{_num(params['pos_xy_std'])}")


def snapshot_iteration(path, stem):
    m = re.search(rf"(?:^|/){re.escape(stem)}_iter_(\d+)\.caffemodel$", path)
    return int(m.group(1)) if m else None


def choose_model(model_dir, fixed_name, stem):
    """``model_dir/fixed_name`` if it exists, else the newest
    ``<stem>_iter_*.caffemodel``, as the kit's ``ls -t ... | head -n 1`` (latest
    modification time, ties to the first name; None when there is none)."""
    fixed = os.path.join(model_dir, fixed_name)
    if os.path.isfile(fixed):
        return fixed
    found = sorted(glob.glob(os.path.join(model_dir, f"{stem}_iter_*.caffemodel")))
    if not found:
        return None
    newest = min(found, key=lambda p: -os.stat(p).st_mtime_ns)
    numbered = [(snapshot_iteration(p.replace(os.sep, "/"), stem), p) for p in found]
    numbered = [(n, p) for n, p in numbered if n is not None]
    highest = max(numbered)[1] if numbered else newest
    if highest != newest:
        logger.warning("%s is the newest file and is used (the kit's `ls -t`); %s has a "
                       "higher iteration. Give %s to choose otherwise.", newest, highest,
                       fixed)
    return newest


def _list_lines(path):
    """The lines of a list file, its bytes decoded as the data layers decode them
    (``os.fsdecode``: bytes that are not UTF-8 survive as lone surrogates)."""
    try:
        with open(path, "rb") as f:
            return os.fsdecode(f.read()).splitlines()
    except OSError as e:
        raise PipelineError(f"cannot read the list '{path}': {e.strerror}") from None


def comm_3(lines1, lines2):
    """``comm -3 a b`` (sorted inputs): lines only in a, and lines only in b indented
    by a tab, in merge order."""
    out, i, j = [], 0, 0
    while i < len(lines1) and j < len(lines2):
        if lines1[i] == lines2[j]:
            i, j = i + 1, j + 1
        elif lines1[i] < lines2[j]:
            out.append(lines1[i])
            i += 1
        else:
            out.append("\t" + lines2[j])
            j += 1
    return out + lines1[i:] + ["\t" + line for line in lines2[j:]]


@contextlib.contextmanager
def _working_dir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _close_data_layers(*nets):
    """Stop prefetching (wait for batches being read) before the working directory
    changes back: list paths are relative to it."""
    for net in nets:
        for layer in getattr(net, "layers", ()):
            inflight = getattr(layer, "_inflight", None)
            if inflight is None:
                continue
            for future, *_ in list(inflight):
                if not future.cancel():
                    try:
                        future.exception()
                    except Exception:         # noqa: BLE001 (cancelled meanwhile)
                        pass
            layer.close()


def _mtime(path):
    return os.path.getmtime(path) if os.path.exists(path) else None


def _all_newer(outputs, inputs):
    """Every output exists and none is older than any input."""
    if not outputs:
        return False
    times = [_mtime(p) for p in outputs]
    if any(t is None for t in times):
        return False
    newest_input = max((_mtime(p) or 0.0 for p in inputs), default=0.0)
    return min(times) >= newest_input


def _json_or_none(path):
    """The JSON in ``path``, or None where there is none to read (a crf step's parameter
    record is missing in folders from before the record existed)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def _config_digests(**paths):
    """{file name: SHA-256} of the expanded configs a step ran with (``net=`` and
    ``solver=`` paths): of what they say, so comments and spacing do not count."""
    from .proto import caffe_pb2
    messages = {"net": caffe_pb2.NetParameter, "solver": caffe_pb2.SolverParameter}
    digests = {}
    for kind, path in paths.items():
        try:
            content = prototxt.read_as_written(path, messages[kind]()).SerializeToString(
                deterministic=True)
        except ValueError:          # (PrototxtError) the step itself will say what is wrong
            with open(path, "rb") as f:
                content = f.read()
        digests[os.path.basename(path)] = hashlib.sha256(content).hexdigest()
    return digests


def _recorded_as(record, current):
    """Whether a step's record allows its outputs: it holds ``current``, or there is
    none (folders from before records, or made by the kit's own scripts)."""
    return _json_or_none(record) in (None, current)


@contextlib.contextmanager
def _recording(record, current, finished=lambda: True):
    """A step's run: until it has written all its outputs (and ``finished()`` says so),
    its record says they are not ``current``'s, so an interrupted run leaves them
    stale."""
    write_atomically(record, json.dumps({"running": current}).encode("utf-8"))
    yield
    if finished():
        write_atomically(record, json.dumps(current).encode("utf-8"))


def _same_search(path, key):
    """Whether the crf_search JSON at ``path`` scored these images and parameter sets."""
    data = _json_or_none(path)
    try:
        return (data["images"] == key["images"] and
                [{n: r["params"][n] for n in CRF_DEFAULTS} for r in data["results"]]
                == key["grid"])
    except (KeyError, TypeError):
        return False


def _require_features(step, test_set, inputs):
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise PipelineError(f"{step} on '{test_set}': features not found: {missing[0]} "
                            f"({len(missing)} missing; run the test steps first)")


def _count_lines(path):
    """``wc -l < path``: the newline characters (a last line without one is not
    counted, blank lines are)."""
    with open(path, "rb") as f:
        text = f.read()
    if text and not text.endswith(b"\n"):
        logger.warning("%s does not end with a newline: its last line is not counted "
                       "(the kit's TEST_ITER is `wc -l`), so its last image is not "
                       "tested", path)
    return text.count(b"\n")


class Pipeline:
    """One experiment folder and the settings of a ``caffelite pascal`` run."""

    def __init__(self, exper_dir, net_id, data_root=None, num_labels=21,
                 train_set_suffix="_aug", steps=DEFAULT_STEPS, force=False, defines=None,
                 gpu=None,
                 test_sets=("val",), test2_sets=("val", "test"), eval_set="val",
                 feature_type="fc8", gt_dir=None, crf_params=None, vis=False, tf32=False,
                 graphs=None, search_values=None, search_images=SEARCH_IMAGES,
                 autotune=False):
        exper_dir = os.path.abspath(exper_dir)
        if not os.path.isdir(exper_dir):
            raise PipelineError(f"experiment folder '{exper_dir}' does not exist")
        self.root = os.path.dirname(exper_dir)
        self.exp = os.path.basename(exper_dir)
        self.net_id = net_id
        self.defines = {k: str(v) for k, v in (defines or {}).items()}
        if data_root is not None:
            # Absolute (the steps run elsewhere), but the text otherwise as given: sed
            # pastes it verbatim, and templates may append to a trailing '/'.
            slash = data_root.endswith(("/", os.sep))
            data_root = os.path.abspath(data_root)
            if slash and not data_root.endswith(os.sep):
                data_root += os.sep
        elif "DATA_ROOT" not in self.defines:
            raise PipelineError("give --data-root (the kit's DATA_ROOT: the folder the "
                                "lists' paths are relative to)")
        self.data_root = data_root
        self.num_labels = int(num_labels)
        self.suffix = train_set_suffix
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise PipelineError(f"unknown step(s) {', '.join(unknown)} (steps: "
                                f"{','.join(STEPS)})")
        self.steps = [s for s in STEPS if s in steps]
        self.force = force
        from .cli import parse_gpu
        self.gpu = parse_gpu(gpu)           # None: the CPU
        # GPU mode only
        self.tf32, self.cuda_graphs, self.autotune = bool(tf32), graphs, bool(autotune)
        self.test_sets, self.test2_sets = list(test_sets), list(test2_sets)
        self.eval_set = eval_set
        self.feature_type = feature_type
        self.gt_dir = os.path.abspath(gt_dir) if gt_dir else None
        # given on the command line (None: not given); the rest from a crf_search's
        # best, else run_densecrf.sh's values
        self.crf_given = {k: v for k, v in (crf_params or {}).items() if v is not None}
        self.search_values = dict(SEARCH_DEFAULTS, **(search_values or {}))
        self.search_images = int(search_images)
        self.vis = vis
        self.results = {}

    # ------------------------------------------------------------------ paths
    @property
    def config_dir(self):
        return f"{self.exp}/config/{self.net_id}"

    @property
    def model_dir(self):
        return f"{self.exp}/model/{self.net_id}"

    @property
    def log_dir(self):
        return f"{self.exp}/log/{self.net_id}"

    def list_path(self, name):
        return f"{self.exp}/list/{name}.txt"

    def feature_dir(self, kind):
        return f"{self.exp}/{kind}/{self.net_id}"

    def res_dir(self, kind, test_set):
        return f"{self.exp}/res/{kind}/{self.net_id}/{test_set}/{self.feature_type}"

    # ------------------------------------------------------------------ variables
    def variables(self, after=None, **step):
        """sub.sed's variables for one step, then the -D definitions.

        ``after`` names the kit section run before this one: its shell variables stay
        set in run_pascal.sh (e.g. TRAIN_SET during test #1), and are set here as if
        every earlier section had run, whichever steps this run selects.
        """
        v = dict.fromkeys(SUB_SED_VARIABLES, "")
        v.update(EXP=self.exp, NET_ID=self.net_id, NUM_LABELS=str(self.num_labels))
        if self.data_root is not None:
            v["DATA_ROOT"] = self.data_root
        order = ("train", "test", "train2", "test2")
        done = order[:order.index(after) + 1] if after in order else ()
        for section in done:
            if section in ("train", "train2"):
                train_set = ("train" if section == "train" else "trainval") + self.suffix
                v.update(TRAIN_SET=train_set, TRAIN_SET_WEAK=self._weak_name(train_set))
            else:
                sets = self.test_sets if section == "test" else self.test2_sets
                kind = "features" if section == "test" else "features2"
                v.update(TEST_SET=sets[-1] if sets else "", FEATURE_DIR=self.feature_dir(kind))
        v.update({k: str(x) for k, x in step.items()})
        v.update(self.defines)
        return v

    def expand(self, name, suffix, variables):
        """``sed ... config/<name>.prototxt > config/<name>_<suffix>.prototxt``."""
        template = f"{self.config_dir}/{name}.prototxt"
        target = f"{self.config_dir}/{name}_{suffix}.prototxt"
        text = prototxt.read_text(template, variables)
        # the template's bytes as read (non-UTF-8 comments included), replaced whole
        write_atomically(target, text.encode("utf-8", "surrogateescape"))
        return target

    def data_path(self, relative):
        """DATA_ROOT + a list entry, concatenated as Caffe's data layers do."""
        return self.variables()["DATA_ROOT"] + relative

    # ------------------------------------------------------------------ checks
    def check(self):
        """Fail before any work on what the selected steps will certainly miss."""
        need = {"train": ["train", "solver"], "train2": ["train", "solver2"],
                "test": ["test"], "test2": ["test"]}
        missing = sorted({f"{self.config_dir}/{t}.prototxt" for s in self.steps
                          for t in need.get(s, ())
                          if not os.path.isfile(f"{self.config_dir}/{t}.prototxt")})
        if missing:
            raise PipelineError(f"missing template(s) for steps {','.join(self.steps)}: "
                                f"{', '.join(missing)}")
        sets = set()
        if "test" in self.steps:
            sets.update(self.test_sets)
        if "test2" in self.steps:
            sets.update(self.test2_sets)
        if "eval" in self.steps or "crf_search" in self.steps:
            sets.add(self.eval_set)
        for name in sorted(sets):
            if not os.path.isfile(self.list_path(name)):
                raise PipelineError(f"list file {self.list_path(name)} not found (needed "
                                    f"by the test/eval steps for set '{name}')")
        root = self.variables()["DATA_ROOT"]
        if root and not os.path.isdir(root):
            raise PipelineError(f"DATA_ROOT '{root}' is not a directory")
        if "crf" in self.steps or "crf_search" in self.steps:
            crf_function()
        if "crf_search" in self.steps:
            self._check_search()
        elif "crf" in self.steps or "eval" in self.steps:
            self._searched_params()             # a broken crf_search.json: say so now

    def _check_search(self):
        from .crf import CRFParams, search
        if self.search_images < 1:
            raise PipelineError(f"--search-images must be at least 1 (got "
                                f"{self.search_images})")
        fixed = dict(CRF_DEFAULTS, **self.crf_given)
        for name, text in self.search_values.items():
            flag = f"--search-{name.replace('_', '-')}"
            try:
                for value in search.parse_values(str(text), name):
                    CRFParams(**dict(fixed, **{name: value}))
            except ValueError as e:
                reason = str(e).split(": ", 1)[-1] if str(e).startswith("--") else str(e)
                raise PipelineError(f"{flag}: {reason}") from None
        tested = self.test2_sets if "test2" in self.steps else \
            self.test_sets if "test" in self.steps else None
        if tested is not None and self.eval_set not in tested:
            option = "--test2-sets" if "test2" in self.steps else "--test-sets"
            raise PipelineError(f"crf_search searches on --eval-set '{self.eval_set}', "
                                f"which the test step of this run does not test ({option} "
                                f"{','.join(tested)})")

    # ------------------------------------------------------------------ running
    def run(self):
        with _working_dir(self.root):
            self.check()
            os.makedirs(self.model_dir, exist_ok=True)
            os.makedirs(self.log_dir, exist_ok=True)
            if self.gpu is not None:
                backend.use_gpu(self.gpu, self.tf32, self.cuda_graphs,
                                self.autotune or None)
            else:
                if self.tf32 or self.cuda_graphs or self.autotune:
                    logger.warning("--tf32, --cuda-graphs and --conv-autotune apply to GPU "
                                   "mode only; running on the CPU")
                backend.set_mode_cpu()
            for step in self.steps:
                getattr(self, f"step_{step}")()
            if "eval" in self.steps:
                self.print_results()
        return self.results

    @contextlib.contextmanager
    def step_log(self, step):
        """The step's log in ``log/<NET_ID>/<step>.<date>-<time>.log`` (glog lines)."""
        path = os.path.abspath(f"{self.log_dir}/{step}.{time.strftime('%Y%m%d-%H%M%S')}.log")
        handler = logging.FileHandler(path)
        handler.setFormatter(GlogFormatter())
        old_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.info("Step %s of %s/%s (log %s)", step, self.exp, self.net_id, path)
        try:
            yield path
        finally:
            logger.removeHandler(handler)
            handler.close()
            logger.setLevel(old_level)

    def skip(self, step, what):
        if self.force:
            return False
        logger.info("Step %s: %s; skipped (--force re-runs it)", step, what)
        return True

    # ------------------------------------------------------------------ train
    def step_train(self):
        init = f"{self.model_dir}/init.caffemodel"
        self._train("train", "train" + self.suffix, "solver",
                    init if os.path.isfile(init) else None, missing_init=init)

    def step_train2(self):
        weights = choose_model(self.model_dir, "init2.caffemodel", "train")
        if weights is None:
            raise PipelineError(f"train2 needs weights: neither {self.model_dir}/"
                                f"init2.caffemodel nor a train_iter_*.caffemodel exists "
                                f"(run the train step first)")
        self._train("train2", "trainval" + self.suffix, "solver2", weights)

    def _weak_name(self, train_set):
        length = self.defines.get("TRAIN_SET_WEAK_LEN", "")
        return (f"{train_set}_diff_{self.defines.get('TRAIN_SET_STRONG', '')}"
                + (f"_head{length}" if length else ""))

    def _weak_list(self, train_set):
        """run_pascal.sh's ``TRAIN_SET_WEAK`` (and its ``comm -3`` list when
        ``-D TRAIN_SET_STRONG=...`` is given; ``-D TRAIN_SET_WEAK_LEN=N`` keeps the
        first N lines, as ``head -n N`` does)."""
        strong = self.defines.get("TRAIN_SET_STRONG", "")
        length = self.defines.get("TRAIN_SET_WEAK_LEN", "")
        weak = self._weak_name(train_set)
        if strong:
            # comm reads bytes: a list that is not UTF-8 (a Latin-1 id) is kept as is
            a, b = (_list_lines(self.list_path(name)) for name in (train_set, strong))
            lines = comm_3(a, b)
            if length:
                if not length.strip().isdigit():
                    raise PipelineError(f"-D TRAIN_SET_WEAK_LEN={length}: must be a whole "
                                        f"number of lines (head -n N)")
                lines = lines[:int(length)]
            write_atomically(self.list_path(weak),
                             os.fsencode("".join(line + "\n" for line in lines)))
        return weak

    def _train(self, step, train_set, solver_name, weights, missing_init=None):
        from .solver import get_solver, install_signal_handlers
        variables = self.variables(after="test" if step == "train2" else None,
                                   TRAIN_SET=train_set,
                                   TRAIN_SET_WEAK=self._weak_list(train_set))
        train_set = variables["TRAIN_SET"]
        net_file = self.expand("train", train_set, variables)
        solver_file = self.expand(solver_name, train_set, variables)
        param = prototxt.read_solver(solver_file)
        final = f"{param.snapshot_prefix}_iter_{param.max_iter}.caffemodel"
        record = f"{param.snapshot_prefix}{TRAIN_RECORD}"
        configs = _config_digests(net=net_file, solver=solver_file)
        if os.path.isfile(final):
            if not _recorded_as(record, configs) and not self.force:
                # a whole training is too dear to redo unasked (a spelling of a path
                # changes the configs too): say so, and keep the snapshot
                logger.warning("Step %s: %s was trained with other configs than %s and %s "
                               "say now (%s); --force trains again", step, final, net_file,
                               solver_file, record)
            if self.skip(step, f"final snapshot {final} exists"):
                return
        with self.step_log(step):
            if weights is None and missing_init:
                # run_pascal.sh trains from the fillers too, silently: a forgotten
                # download of the released init model would cost a whole training run
                logger.warning("%s not found: training %s from its fillers (as "
                               "run_pascal.sh does)", missing_init, self.net_id)
            logger.info("Running train --solver=%s%s", solver_file,
                        f" --weights={weights}" if weights else "")
            solver = get_solver(solver_file)
            try:
                if weights:
                    solver.load_weights([weights])
                restore = install_signal_handlers(solver)
                # a stopped run (SIGINT/SIGHUP) ends without its final snapshot
                with _recording(record, configs, lambda: os.path.isfile(final)):
                    try:
                        solver.solve()
                    finally:
                        restore()
            finally:
                _close_data_layers(solver.net, *solver.test_nets)

    # ------------------------------------------------------------------ test
    def step_test(self):
        self._test("test", self.test_sets, "features", "test.caffemodel", "train",
                   ["fc8", "fc9", "seg_score"])

    def step_test2(self):
        self._test("test2", self.test2_sets, "features2", "test2.caffemodel", "train2",
                   ["fc8", "crf"])

    def _test(self, step, sets, kind, fixed_model, stem, subdirs):
        for test_set in sets:
            model = choose_model(self.model_dir, fixed_model, stem)
            if model is None:
                raise PipelineError(f"{step} on '{test_set}': no model: neither "
                                    f"{self.model_dir}/{fixed_model} nor a {stem}_iter_*"
                                    f".caffemodel exists")
            iterations = _count_lines(self.list_path(test_set))
            if iterations == 0:
                raise PipelineError(f"{step} on '{test_set}': {self.list_path(test_set)} "
                                    f"has no complete line (`wc -l` is 0, so the kit would "
                                    f"test nothing)")
            variables = self.variables(after="train" if step == "test" else "train2",
                                       TEST_SET=test_set, FEATURE_DIR=self.feature_dir(kind))
            for sub in subdirs:
                os.makedirs(f"{variables['FEATURE_DIR']}/{variables['TEST_SET']}/{sub}",
                            exist_ok=True)
            net_file = self.expand("test", variables["TEST_SET"], variables)
            outputs = mat_write_outputs(net_file, iterations)
            record = f"{variables['FEATURE_DIR']}/{variables['TEST_SET']}/{TEST_RECORD}"
            configs = _config_digests(net=net_file)
            finished = _all_newer(outputs, [model])
            if finished and not _recorded_as(record, configs):
                finished = False
                logger.info("Step %s: the features of '%s' were made with another %s "
                            "(%s); testing again", step, test_set, net_file, record)
            if finished and self.skip(
                    step, f"all {len(outputs)} feature files of '{test_set}' exist and are "
                          f"newer than {model}"):
                continue
            with self.step_log(f"{step}_{test_set}"):
                logger.info("Running test --model=%s --weights=%s --iterations=%d",
                            net_file, model, iterations)
                with _recording(record, configs):
                    run_test_net(net_file, model, iterations)

    # ------------------------------------------------------------------ crf
    @property
    def crf_params(self):
        """The CRF's parameters: those given, else a crf_search's best, else
        run_densecrf.sh's values."""
        params = dict(CRF_DEFAULTS)
        params.update(self._searched_params())
        params.update(self.crf_given)
        return params

    def search_json(self, kind=None):
        kind = kind or self.crf_kind()
        return f"{self.res_dir(kind, self.eval_set)}/crf_search.json"

    def _searched_params(self):
        if all(k in self.crf_given for k in CRF_DEFAULTS):
            return {}
        path = self.search_json()
        if not os.path.isfile(path):
            return {}
        try:
            with open(path, "rb") as f:
                best = json.loads(f.read().decode("utf-8"))["best_params"]
            params = {k: best[k] for k in CRF_DEFAULTS}
            from .crf import CRFParams
            CRFParams(**params)                 # numbers the CRF takes
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PipelineError(f"{path}: not a crf_search result ({e}); delete it or "
                                f"run the crf_search step again") from None
        return params

    def _params_origin(self):
        taken = [k for k in CRF_DEFAULTS if k not in self.crf_given]
        if taken and self._searched_params():
            return f"; {', '.join(taken)} from {self.search_json()}"
        return ""

    def step_crf_search(self):
        from .crf import CRFParams, search
        kind = self.crf_kind()
        test_set = self.eval_set
        features = f"{self.feature_dir(kind)}/{test_set}/{self.feature_type}"
        items = self.items(test_set)[:self.search_images]
        inputs = [f"{features}/{i.id}_blob_0.mat" for i in items]
        _require_features("crf_search", test_set, inputs)
        for item in items:
            for what, path in (("image", item.image), ("ground truth", item.gt)):
                if not os.path.isfile(path):
                    raise PipelineError(f"crf_search on '{test_set}': {what} not found for "
                                        f"'{item.id}': {path}")
        fixed = dict(CRF_DEFAULTS, **self.crf_given)
        for name in self.search_values:
            if name in self.crf_given:
                logger.warning("--crf-%s %g is given: the crf step takes it whatever the "
                               "search finds", name.replace("_", "-"), self.crf_given[name])
        values = {n: search.parse_values(str(v), n) for n, v in self.search_values.items()}
        grid = search.parameter_grid(CRFParams(**fixed), values)
        out = self.search_json(kind)
        key = {"images": [i.id for i in items],
               "grid": [{n: getattr(p, n) for n in CRF_DEFAULTS} for p in grid]}
        if _all_newer([out], inputs) and _same_search(out, key) and self.skip(
                "crf_search", f"{out} holds this search"):
            return
        with self.step_log(f"crf_search_{kind}_{test_set}"):
            logger.info("CRF search on %d images of '%s' (%s), %d parameter sets: %s",
                        len(items), test_set, features, len(grid),
                        ", ".join(f"{n} {v}" for n, v in self.search_values.items()))
            tasks = [search.search_task(i.id, f"{features}/{i.id}_blob_0.mat", i.image,
                                        i.gt, grid, num_labels=self.num_labels)
                     for i in items]
            confusions = search.run_search(tasks)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            search.report(tasks, grid, confusions, json_path=out)
            logger.info("The crf and eval steps now take %s",
                        ", ".join(f"{k}={v:g}" for k, v in self.crf_params.items()))

    def crf_kind(self):
        """The features the CRF and the report start from: the latest stage's."""
        if "test2" in self.steps or glob.glob(
                f"{self.feature_dir('features2')}/{self.eval_set}/{self.feature_type}/*.mat"):
            return "features2"
        return "features"

    def items(self, test_set):
        """``EvalItem``s of a list: GT and image paths under DATA_ROOT."""
        out = []
        for line in read_list(self.list_path(test_set)):
            image = self.data_path(line.image) if line.image else \
                self.data_path(f"/JPEGImages/{line.id}.jpg")
            official = self.data_path(f"/SegmentationClass/{line.id}.png")
            if self.gt_dir:
                gt = os.path.join(self.gt_dir, f"{line.id}.png")
            elif line.label and not os.path.isfile(official):
                gt = self.data_path(line.label)
            else:
                gt = official
            out.append(EvalItem(line.id, gt, image))
        return out

    def step_crf(self):
        kind = self.crf_kind()
        sets = self.test2_sets if kind == "features2" else self.test_sets
        for test_set in sets:
            features = f"{self.feature_dir(kind)}/{test_set}/{self.feature_type}"
            out_dir = f"{self.res_dir(kind, test_set)}/{crf_folder(self.crf_params)}"
            items = self.items(test_set)
            inputs = [f"{features}/{i.id}_blob_0.mat" for i in items]
            outputs = [f"{out_dir}/{i.id}.png" for i in items]
            _require_features("crf", test_set, inputs)
            record = f"{out_dir}/{CRF_RECORD}"
            params = self.crf_params
            if _all_newer(outputs, inputs) and _recorded_as(record, params) \
                    and self.skip("crf", f"all {len(outputs)} CRF labels of '{test_set}' "
                                         f"exist in {out_dir}"):
                continue
            with self.step_log(f"crf_{kind}_{test_set}"):
                os.makedirs(out_dir, exist_ok=True)
                logger.info("Running the dense CRF (%s%s) on %s -> %s",
                            ", ".join(f"{k}={v}" for k, v in params.items()),
                            self._params_origin(), features, out_dir)
                with _recording(record, params):
                    run_crf(features, items, out_dir, params, self.num_labels)

    # ------------------------------------------------------------------ eval
    def step_eval(self):
        test_set = self.eval_set
        items = self.items(test_set)
        done_any = False
        for kind in ("features", "features2"):
            features = f"{self.feature_dir(kind)}/{test_set}/{self.feature_type}"
            if not glob.glob(f"{features}/*_blob_0.mat"):
                continue
            done_any = True
            res = self.res_dir(kind, test_set)
            inputs = [f"{features}/{i.id}_blob_0.mat" for i in items]
            self._eval_one(f"{res}/post_none", items, inputs, feature_dir=features)
            crf_dir = f"{res}/{crf_folder(self.crf_params)}"
            crf_outputs = [f"{crf_dir}/{i.id}.png" for i in items]
            if all(os.path.isfile(p) for p in crf_outputs):
                self._eval_one(crf_dir, items, crf_outputs, pred_dir=crf_dir)
        if not done_any:
            raise PipelineError(f"eval: no features of '{test_set}' in "
                                f"{self.feature_dir('features')} or "
                                f"{self.feature_dir('features2')} (run the test steps first)")

    def _eval_one(self, out_dir, items, inputs, feature_dir=None, pred_dir=None):
        result_json = f"{out_dir}/results.json"
        if _all_newer([result_json], inputs) and self.skip(
                "eval", f"{result_json} is newer than its {len(inputs)} inputs"):
            with open(result_json, encoding="utf-8") as f:
                self.results[out_dir] = EvalResult.from_json(json.load(f))
            return
        os.makedirs(out_dir, exist_ok=True)
        kind = "features2" if "/features2/" in out_dir else "features"
        with self.step_log(f"eval_{kind}_{os.path.basename(out_dir)}"):
            logger.info("Evaluating %s against the ground truth of %d images",
                        feature_dir or pred_dir, len(items))
            result = evaluate(items, self.num_labels, feature_dir=feature_dir,
                              pred_dir=pred_dir,
                              pred_out_dir=out_dir if feature_dir else None,
                              vis_dir=f"{out_dir}/vis" if self.vis else None)
            report = result.report()
            for line in report.splitlines():
                logger.info("%s", line)
        write_atomically(f"{out_dir}/results.txt", (report + "\n").encode("utf-8"))
        result.write_json(result_json)
        self.results[out_dir] = result

    def print_results(self):
        """The last result's full MyVOCevalseg report, then every result's mean IoU."""
        if not self.results:
            return
        out_dir, result = list(self.results.items())[-1]
        print(f"== {out_dir} ({result.num_images} images)")
        print(result.report())
        print("== mean IoU (over all classes, as MyVOCevalseg); reports in results.txt")
        for out_dir, result in self.results.items():
            print(f"{100 * result.miou:7.3f}%  {out_dir}")


# ---------------------------------------------------------------------- test nets
def mat_write_outputs(net_file, iterations):
    """The files the net's MatWrite layers write in ``iterations`` TEST forwards."""
    from .layers.deeplab_eval import read_id_list
    from .net import filter_net
    from .proto import caffe_pb2
    param, _ = prototxt.read_net(net_file)
    state = caffe_pb2.NetState()
    state.phase = caffe_pb2.TEST
    outputs = []
    for layer in filter_net(param, state, log=False).layer:
        if layer.type != "MatWrite":
            continue
        p = layer.mat_write_param
        names = None
        if p.HasField("source"):      # the ids exactly as the MatWrite layer reads them
            names = read_id_list(p.source, p.strip, _ListUser(net_file, layer.name))
        for it in range(0, iterations, max(p.period, 1)):
            if names is not None and it >= len(names):
                break
            stem = p.prefix + (names[it] if names is not None else f"iter_{it}")
            outputs += [f"{stem}_blob_{i}.mat" for i in range(len(layer.bottom))]
    return outputs


class _ListUser:
    """What the data layers' list readers need of a layer (its name, ``error``), for
    reading a net's lists here: errors name the net file and the layer."""

    def __init__(self, net_file, name):
        self.net_file, self.name = net_file, name

    def error(self, message):
        return PipelineError(f"{self.net_file}: MatWrite layer '{self.name}': {message}")


def run_test_net(net_file, weights, iterations):
    """``caffe test``: TEST-phase forwards with ``caffelite test``'s log lines."""
    from . import TEST, Net
    from .cli import score
    net = Net(net_file, TEST, weights=weights)
    try:
        score(net, iterations)
    finally:
        _close_data_layers(net)


# ---------------------------------------------------------------------- CRF
def crf_function():
    """``caffelite.crf``'s ``CRFParams`` and ``caffelite crf``'s per-image
    ``refine_image``, or a clear error while the CRF is not available."""
    try:
        from .crf import CRFParams
        from .crf.cli import refine_image
    except ImportError as e:
        raise PipelineError(f"the crf step is not available yet in this caffelite build "
                            f"(caffelite.crf: {e}); leave 'crf' out of --steps") from None
    return CRFParams, refine_image


def run_crf(feature_dir, items, out_dir, params, num_labels=None):
    """``prog_refine_pascal_v4`` over a set: each ``<id>_blob_0.mat`` cropped to its
    image, unary = -score, RGB image features, labels written as VOC-palette PNGs.
    ``caffelite crf``'s per-image checks apply (class count, size, NaN)."""
    from .evaluate import write_label_png
    CRFParams, refine_image = crf_function()
    crf_params = CRFParams(**params)
    for n, item in enumerate(items, 1):
        labels = refine_image(f"{feature_dir}/{item.id}_blob_0.mat", item.image, crf_params,
                              num_labels=num_labels)
        write_label_png(f"{out_dir}/{item.id}.png", labels.astype("uint8"))
        if n % 100 == 0 or n == len(items):
            logger.info("CRF: %d/%d images", n, len(items))


# ---------------------------------------------------------------------- CLI
def add_parser(subparsers):
    from .cli import common_arguments
    sp = subparsers.add_parser(
        "pascal", help="the DeepLab kit's run_pascal.sh + CRF + evaluation as one command",
        description=__doc__.split("\n\n")[0])
    sp.add_argument("exper_dir", metavar="EXPER_DIR", help="the kit's ${EXP} folder")
    sp.add_argument("--net", required=True, metavar="NET_ID",
                    help="the config/<NET_ID> to run")
    sp.add_argument("--data-root", help="DATA_ROOT: the folder the lists' paths are in")
    sp.add_argument("--num-labels", type=int, default=21,
                    help="NUM_LABELS: the classes of the nets and the evaluation (21)")
    sp.add_argument("--train-set-suffix", default="_aug",
                    help="TRAIN_SET = train<suffix>, trainval<suffix> (default _aug; "
                         "--train-set-suffix= for none)")
    sp.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                    help=f"comma-separated subset of {','.join(STEPS)} (default: all but "
                         f"crf_search)")
    sp.add_argument("--force", action="store_true", help="re-run finished steps")
    sp.add_argument("--test-sets", default="val", help="test #1 sets (default val)")
    sp.add_argument("--test2-sets", default="val,test", help="test #2 sets (default val,test)")
    sp.add_argument("--eval-set", default="val", help="the set to evaluate (default val)")
    sp.add_argument("--feature-type", default="fc8",
                    help="the features subfolder the CRF and evaluation read (fc8)")
    sp.add_argument("--gt", help="ground-truth folder <gt>/<id>.png (default: the lists' "
                                 "second column under DATA_ROOT)")
    sp.add_argument("--vis", action="store_true",
                    help="also write coloured predictions, overlays and an IoU chart")
    crf = sp.add_argument_group("dense CRF (run_densecrf.sh's names and example values)")
    for name, default in CRF_DEFAULTS.items():
        crf.add_argument(f"--crf-{name.replace('_', '-')}", dest=f"crf_{name}",
                         type=int if name == "max_iter" else float, default=None,
                         help=f"default: a crf_search's best, else {default}")
    found = sp.add_argument_group("crf_search step (the DeepLab-v2 paper's first round)")
    for name, default in SEARCH_DEFAULTS.items():
        found.add_argument(f"--search-{name.replace('_', '-')}", dest=f"search_{name}",
                           default=default, help=f"values to try: a list or a MATLAB range "
                                                 f"(default {default})")
    found.add_argument("--search-images", type=int, default=SEARCH_IMAGES,
                       help=f"the first N images of --eval-set (default {SEARCH_IMAGES})")
    common_arguments(sp, gpu_help="GPU id for every step (the kit's --gpu=${DEV_ID}); "
                                  "the CPU if omitted",
                     define_help="set or override a sub.sed variable (repeatable)")
    sp.set_defaults(func=run)
    return sp


def _split(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def run(args):
    from .cli import parse_defines
    pipeline = Pipeline(
        args.exper_dir, args.net, data_root=args.data_root, num_labels=args.num_labels,
        train_set_suffix=args.train_set_suffix, steps=_split(args.steps), force=args.force,
        defines=parse_defines(args.define), gpu=args.gpu, test_sets=_split(args.test_sets),
        test2_sets=_split(args.test2_sets), eval_set=args.eval_set,
        feature_type=args.feature_type, gt_dir=args.gt,
        crf_params={k: getattr(args, f"crf_{k}") for k in CRF_DEFAULTS}, vis=args.vis,
        tf32=args.tf32, graphs=args.cuda_graphs, autotune=args.conv_autotune,
        search_values={k: getattr(args, f"search_{k}") for k in SEARCH_DEFAULTS},
        search_images=args.search_images)
    pipeline.run()
    return 0


__all__ = ["Pipeline", "PipelineError", "add_parser", "run", "choose_model", "comm_3",
           "DEFAULT_STEPS", "STEPS",
           "crf_folder", "mat_write_outputs"]
