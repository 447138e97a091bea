"""Logging in glog's line format so Caffe's log parsers read our logs.

``I1125 10:00:00.123456  1234 solver.py:123] Iteration 20, loss = 0.5``
"""
import logging
import os
import sys
import time

_LEVELS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W",
           logging.ERROR: "E", logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    def format(self, record):
        t = time.localtime(record.created)
        micros = int((record.created - int(record.created)) * 1e6)
        prefix = (f"{_LEVELS.get(record.levelno, 'I')}{t.tm_mon:02d}{t.tm_mday:02d} "
                  f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} "
                  f"{os.getpid():5d} {record.filename}:{record.lineno}] ")
        return prefix + record.getMessage()


logger = logging.getLogger("caffelite")
logger.addHandler(logging.NullHandler())


def setup_logging(level=logging.INFO, log_file=None, stream=sys.stderr):
    """Route caffelite's log to ``stream`` (and ``log_file``) in glog format."""
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handlers = [logging.StreamHandler(stream)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(GlogFormatter())
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False
