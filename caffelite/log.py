"""Logging in glog's line format so Caffe's log parsers read our logs.

``I1125 10:00:00.123456  1234 solver.py:123] Iteration 20, loss = 0.5``

The command line also honours glog's environment as Caffe's tools see it:
``GLOG_minloglevel`` (0 INFO .. 3 FATAL: lower levels are not logged),
``GLOG_log_dir`` (log files as glog names them, e.g. what run_pascal.sh exports),
``GLOG_logtostderr`` (stderr only, no files) and ``GLOG_stderrthreshold``; the
command line's ``-alsologtostderr=false`` leaves stderr the lines from that threshold
up (caffe.cpp turns alsologtostderr on before it reads its flags).
"""
import getpass
import logging
import math
import os
import re
import socket
import sys
import time

import numpy as np

_LEVELS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W",
           logging.ERROR: "E", logging.CRITICAL: "F"}
# glog's severities, lowest first, and the logging level each file starts at.
_SEVERITIES = (("INFO", logging.DEBUG), ("WARNING", logging.WARNING),
               ("ERROR", logging.ERROR), ("FATAL", logging.CRITICAL))


class GlogFormatter(logging.Formatter):
    def format(self, record):
        t = time.localtime(record.created)
        micros = int((record.created - int(record.created)) * 1e6)
        prefix = (f"{_LEVELS.get(record.levelno, 'I')}{t.tm_mon:02d}{t.tm_mday:02d} "
                  f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} "
                  f"{os.getpid():5d} {record.filename}:{record.lineno}] ")
        return prefix + record.getMessage()


def ostream_g(value):
    """A number as C++'s ostream prints it (precision 6, %g), a NaN with its sign as
    glibc does: "-nan" for the NaN that x86 arithmetic makes (0/0, inf - inf)."""
    value = float(value)
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    return "%g" % value


def format_output(name, value, weight):
    """Caffe's "name = value (* weight = weight * value loss)" of a net output, the
    product in float32."""
    text = f"{name} = {ostream_g(value)}"
    if weight:
        product = np.float32(weight) * np.float32(value)
        text += f" (* {ostream_g(weight)} = {ostream_g(product)} loss)"
    return text


# No handler of its own until a command (or caffe.init_log()) sets one up: a script's
# warnings and errors then reach stderr through Python's last-resort handler, or the
# script's own logging configuration.
logger = logging.getLogger("caffelite")


def glog_level(severity):
    """The logging level of glog severity 0 INFO .. 3 FATAL (INFO: caffelite's debug
    lines, which Caffe does not have, stay out)."""
    severity = min(max(int(severity), 0), 3)
    return logging.INFO if severity == 0 else _SEVERITIES[severity][1]


def setup_logging(level=logging.INFO, log_file=None, stream=None, environ=None,
                  stderr_threshold=False):
    """Route caffelite's log to ``stream`` (sys.stderr as it is now, if None; and
    ``log_file``) in glog format, and to glog's own files where ``GLOG_log_dir`` asks
    for them.  ``stderr_threshold``: the stream gets only what glog's alsologtostderr
    and stderrthreshold let through (the command line's rule; else everything)."""
    environ = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    handlers = [StatusLineHandler(stream)]
    if stderr_threshold:
        handlers[0].setLevel(_stderr_level(environ))
    if log_file:
        # names read from lists as bytes are written back as those bytes, as glog does
        handlers.append(logging.FileHandler(log_file, errors="surrogateescape"))
    log_dir = environ.get("GLOG_log_dir", "")
    if log_dir and not _env_bool(environ.get("GLOG_logtostderr")):
        handlers += [GlogFile(log_dir, severity, start, stream)
                     for severity, start in _SEVERITIES]
    for h in handlers:
        h.setFormatter(GlogFormatter())
        logger.addHandler(h)
    logger.setLevel(max(level, _min_log_level(environ)))
    logger.propagate = False


def log_fatal_to_files(message):
    """An F line with the reason a command stopped, in the log files only (stderr gets
    the command's own one-line error)."""
    caller = sys._getframe(1)
    record = logger.makeRecord(logger.name, logging.CRITICAL, caller.f_code.co_filename,
                               caller.f_lineno, message, None, None)
    for h in logger.handlers:
        if isinstance(h, (GlogFile, logging.FileHandler)):
            h.handle(record)


def _env_bool(value):
    """glog's BoolFromEnv: set and starting with t, T, y, Y or 1 (or empty)."""
    return value is not None and (value[:1] in ("t", "T", "y", "Y", "1", ""))


def _stderr_level(environ):
    """What reaches stderr: everything with GLOG_logtostderr or alsologtostderr (unset:
    on, as caffe.cpp sets it), else glog's stderrthreshold (2, ERROR, by default)."""
    also = environ.get("GLOG_alsologtostderr")
    if _env_bool(environ.get("GLOG_logtostderr")) or also is None or _env_bool(also):
        return logging.NOTSET
    threshold = _env_severity(environ, "GLOG_stderrthreshold", 2)
    return _SEVERITIES[threshold][1] if threshold > 0 else logging.NOTSET


def log_python_warnings():
    """Python warnings (numpy's RuntimeWarning of a diverging run ...) as one glog W line
    each, naming where they were raised, instead of Python's two-line text on stderr:
    logs stay parseable by Caffe's log parsers."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        if logger.isEnabledFor(logging.WARNING):       # GLOG_minloglevel
            record = logger.makeRecord(logger.name, logging.WARNING, filename, lineno,
                                       "%s: %s", (category.__name__, message), None)
            logger.handle(record)
    warnings.showwarning = show


class StatusLineHandler(logging.StreamHandler):
    """A stream handler that keeps a status line (a progress bar on a terminal) below
    the log: the line is cleared before each record and drawn again after it."""
    status = ""             # the line now shown on the terminal, if any

    def emit(self, record):
        shown = StatusLineHandler.status
        if shown:
            self.stream.write("\r" + " " * len(shown) + "\r")
        super().emit(record)
        if shown:
            self.stream.write(shown)
            self.flush()


def stderr_shows_info():
    """Whether INFO lines reach the status-line stream (stderr)."""
    return logger.isEnabledFor(logging.INFO) and any(
        isinstance(h, StatusLineHandler) and h.level <= logging.INFO
        for h in logger.handlers)


def show_status_line(text, stream=None):
    """Draw ``text`` as the terminal's status line (replacing the previous one); an empty
    ``text`` ends it with a newline."""
    stream = sys.stderr if stream is None else stream
    previous = StatusLineHandler.status
    if text:
        padding = " " * max(len(previous) - len(text), 0)
        stream.write("\r" + text + padding)
    elif previous:
        stream.write("\n")
    StatusLineHandler.status = text
    stream.flush()


def _min_log_level(environ):
    """GLOG_minloglevel as glog reads it (atoi): 1 drops INFO, 2 WARNING, 3 ERROR."""
    level = _env_severity(environ, "GLOG_minloglevel", 0)
    return _SEVERITIES[level][1] if level > 0 else logging.DEBUG


def _env_severity(environ, name, default):
    """A glog severity from the environment as glog reads it (atoi), within 0..3."""
    number = re.match(r"\s*([+-]?\d+)", environ.get(name, ""))
    return min(max(int(number.group(1)), 0), 3) if number else default


class GlogFile(logging.Handler):
    """One of glog's log files: ``<program>.<host>.<user>.log.<SEVERITY>.<date>-<time>.
    <pid>`` in the log folder, made at its first line (with glog's three-line header)
    and pointed at by the ``<program>.<SEVERITY>`` link; it holds every line of its
    severity and above."""

    def __init__(self, log_dir, severity, level, stream):
        super().__init__(level)
        self.log_dir, self.severity, self.stream = log_dir, severity, stream
        self.file = None
        self.failed = False

    def emit(self, record):
        if self.failed:
            return
        try:
            if self.file is None:
                self._open(record.created)
            self.file.write(self.format(record) + "\n")
            self.file.flush()
        except OSError as e:
            self.failed = True
            self.stream.write(f"Could not create logging file: {e.strerror}\n"
                              f"COULD NOT CREATE A LOGGINGFILE in {self.log_dir}!\n")

    def _open(self, created):
        program = os.path.basename(sys.argv[0])
        if not program or program.endswith(".py"):       # python -m caffelite.cli
            program = "caffelite"
        t = time.localtime(created)
        name = (f"{program}.{socket.gethostname()}.{_user()}.log.{self.severity}."
                f"{time.strftime('%Y%m%d-%H%M%S', t)}.{os.getpid()}")
        path = os.path.join(self.log_dir, name)
        self.file = open(path, "a", encoding="utf-8", errors="surrogateescape")
        self.file.write(f"Log file created at: {time.strftime('%Y/%m/%d %H:%M:%S', t)}\n"
                        f"Running on machine: {socket.gethostname()}\n"
                        "Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid "
                        "file:line] msg\n")
        link = os.path.join(self.log_dir, f"{program}.{self.severity}")
        try:                              # glog: unlink, then symlink the bare name
            if os.path.islink(link):
                os.unlink(link)
            if not os.path.exists(link):
                os.symlink(name, link)
        except OSError:
            pass

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


def _user():
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "invalid-user"


# glog reads GLOG_minloglevel when the library loads: a script that sets it before
# importing (os.environ['GLOG_minloglevel'] = '2') silences warnings even before
# init_log(); unset, the script's own logging configuration decides.
if os.environ.get("GLOG_minloglevel", "").strip():
    logger.setLevel(max(logging.INFO, _min_log_level(os.environ)))
