"""These tests import verl: `make test-verl` runs them in .venv-verl; without verl they are not collected."""

import importlib.util
import os
import sys

collect_ignore_glob = [] if importlib.util.find_spec("verl") is not None else ["test_*.py"]

# align_tokenizers lives one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
