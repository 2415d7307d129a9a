"""Shared fixtures. Tests never touch the network: the Hub is forced offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# one_torch_thread: 1 torch thread per test; hub_folders/loopback_hub: the loopback Hub (tests/hub_server.py)
from tests.fixtures import hub_folders, loopback_hub, one_torch_thread  # noqa: F401
from tests.standins import standin_pair  # noqa: F401  (session-scoped stand-in factory, tests/standins.py)
