import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

SHARED = os.environ.get("CAFFELITE_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
CORPUS = os.path.join(SHARED, "corpus")


def corpus_path(*parts):
    path = os.path.join(CORPUS, *parts)
    if not os.path.exists(path):
        pytest.skip(f"corpus file not available: {path}")
    return path
