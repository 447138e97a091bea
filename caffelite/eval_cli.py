"""``caffelite eval``: the DeepLab kit's EvalSegResults + MyVOCevalseg without MATLAB.

    caffelite eval --gt DIR --list val.txt (--pred DIR | --features DIR)
                   [--num-labels 21] [--dataset voc|coco] [--argmax-features]
                   [--ignore 255] [--json out.json] [--vis DIR] [--images DIR]
                   [--skip-missing]

Prints MyVOCevalseg's report (pixel accuracy, per-class accuracy, per-class IoU and
their means, with its conventions: see ``caffelite.evaluate``).
"""
import os

from .evaluate import (DATASETS, EvalError, class_names, evaluate, items_from_dirs,
                       read_list)


def check_output_dir(flag, path, error=EvalError):
    """Fail (raising ``error``) before any work when an output folder cannot be one."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{flag}: '{path}' exists and is not a directory")


def make_writable_dir(flag, path, error=EvalError):
    """Make the output folder and check that a file can be written in it, before any
    work (a read-only or full disk would fail at the first result otherwise)."""
    import tempfile
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".caffelite-probe-"):
            pass
    except OSError as e:
        raise error(f"{flag}: cannot write into '{path}' ({e.strerror})") from None


def check_not_an_input(flag, path, inputs, error=EvalError):
    """Fail before any work when the output ``path`` is one of the command's inputs
    (``inputs``: {flag: file or folder}) or an existing file in an input folder: writing
    there would overwrite what the user gave (ground truth, images, the list)."""
    if not path or not os.path.exists(path):
        return
    folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else None
    for in_flag, in_path in inputs.items():
        if not in_path or not os.path.exists(in_path):
            continue
        if os.path.samefile(path, in_path):
            raise error(f"{flag}: '{path}' is the {in_flag} input; write {flag} elsewhere "
                        f"(it would be overwritten)")
        if folder is not None and os.path.samefile(folder, in_path):
            raise error(f"{flag}: '{path}' is a file in the {in_flag} folder; write {flag} "
                        f"elsewhere (it would be overwritten)")


def claim_output_folder(flag, folder, outputs, command, error=EvalError):
    """Refuse, before any work, an output folder that already holds some of the files
    this run writes (``outputs``) unless an earlier run of ``command`` marked it as its
    own: those files would be someone else's label PNGs -- ground truth, another
    run's results -- and would be overwritten.  Then mark the folder, so that a run
    into the same folder again (the usual re-run) goes ahead."""
    marker = os.path.join(folder, f".caffelite_{command.replace(' --', '_')}")
    if os.path.isdir(folder) and not os.path.exists(marker):
        clash = [path for path in outputs if os.path.isfile(path)]
        if clash:
            raise error(
                f"{flag}: '{folder}' already holds {len(clash)} of the files this run "
                f"would write (e.g. '{clash[0]}') and is no folder that 'caffelite "
                f"{command}' wrote before: they could be ground truth or other results, "
                f"and would be overwritten; give {flag} a new or empty folder (or delete "
                f"those files)")
    try:
        os.makedirs(folder, exist_ok=True)
        open(marker, "a").close()
    except OSError as e:
        raise error(f"{flag}: cannot write into '{folder}' ({e.strerror})") from None


def check_output_file(flag, path):
    """Fail before any work when an output file cannot be written where asked."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise EvalError(f"{flag}: '{path}' is a directory")
    if not os.path.isdir(directory):
        raise EvalError(f"{flag}: cannot write '{path}': directory '{directory}' does "
                        f"not exist")


def add_parser(subparsers):
    sp = subparsers.add_parser(
        "eval", help="mean IoU of predictions or MatWrite features (MyVOCevalseg)",
        description=__doc__.split("\n\n")[0])
    sp.add_argument("--gt", required=True,
                    help="ground-truth PNGs <gt>/<id>.png (gray or palette; 16-bit ones "
                         "read in full, as MATLAB does)")
    sp.add_argument("--list", required=True,
                    help="ids, or the kit's '/JPEGImages/x.jpg /Seg.../x.png' lines")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", help="predicted label PNGs <pred>/<id>.png (or the dense "
                                    "CRF refine program's <id>.bin)")
    src.add_argument("--features", help="MatWrite features <features>/<id>_blob_0.mat")
    sp.add_argument("--num-labels", type=int, default=None,
                    help="classes, background included (default: 21, or 91 with "
                         "--dataset coco)")
    sp.add_argument("--dataset", choices=DATASETS,
                    help="class names: voc (21) or coco (91, 'void' ids left out of the "
                         "rows and means, as MyVOCevalseg); default: by --num-labels")
    sp.add_argument("--argmax-features", action="store_true",
                    help="the features are labels already, one channel (EvalSegResults' "
                         "is_argmax, e.g. a net ending in ArgMax)")
    sp.add_argument("--ignore", type=int, default=255, help="GT label to ignore")
    sp.add_argument("--json", help="write the scores and confusion matrix here")
    sp.add_argument("--vis", help="write VOC-coloured predictions, overlays on the "
                                  "images (with --images) and an IoU bar chart here (a "
                                  "folder already holding such files that an earlier "
                                  "'eval --vis' did not write is refused)")
    sp.add_argument("--images", help="images <images>/<id>.jpg for the overlays")
    sp.add_argument("--skip-missing", action="store_true",
                    help="warn about and skip ids without a prediction (as MATLAB does) "
                         "instead of failing")
    sp.add_argument("--log", help="also write the log to this file")
    sp.set_defaults(func=run)
    return sp


def run(args):
    if args.num_labels is None:
        args.num_labels = 91 if args.dataset == "coco" else 21
    if args.num_labels < 1:
        raise EvalError(f"--num-labels must be positive (got {args.num_labels})")
    for flag, path in (("--gt", args.gt), ("--pred", args.pred),
                       ("--features", args.features), ("--images", args.images)):
        if path is not None and not os.path.isdir(path):
            raise EvalError(f"{flag}: '{path}' is not a directory")
    check_output_dir("--vis", args.vis)
    inputs = {"--gt": args.gt, "--list": args.list, "--pred": args.pred,
              "--features": args.features, "--images": args.images}
    check_not_an_input("--vis", args.vis, inputs)
    if args.json:
        check_output_file("--json", args.json)
        check_not_an_input("--json", args.json, inputs)
    ids = [line.id for line in read_list(args.list)]
    items = items_from_dirs(ids, args.gt, args.images)
    if args.vis:
        written = [f"{i}.png" for i in ids] + ["iou.png"] + (
            [f"{i}_overlay.jpg" for i in ids] if args.images else [])
        claim_output_folder("--vis", args.vis,
                            [os.path.join(args.vis, name) for name in written], "eval --vis")
    if args.argmax_features and not args.features:
        raise EvalError("--argmax-features applies to --features")
    names = class_names(args.num_labels, args.dataset)
    result = evaluate(items, args.num_labels, feature_dir=args.features, pred_dir=args.pred,
                      ignore_label=args.ignore, names=names, vis_dir=args.vis,
                      skip_missing=args.skip_missing, argmax_done=args.argmax_features)
    print(result.report())
    if args.json:
        result.write_json(args.json)
    return 0
