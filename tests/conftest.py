"""Shared fixtures. Tests never touch the network: the Hub is forced offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
from tests.fixtures import one_torch_thread  # noqa: F401  (fixture for every module: 1 torch thread per test)
from tests.standins import standin_pair  # noqa: F401  (session-scoped stand-in factory, tests/standins.py)
