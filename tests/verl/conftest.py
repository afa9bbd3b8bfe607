"""These tests import verl: `make test-verl` runs them in .venv-verl; without verl they are not collected."""

import importlib.util
import os
import sys

# this folder is itself importable as a namespace package "verl": only a real (regular) package counts
_spec = importlib.util.find_spec("verl")
collect_ignore_glob = [] if _spec is not None and _spec.origin not in (None, "namespace") else ["test_*.py"]

# align_tokenizers lives one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
