"""transformers and PEFT names, imported under one process-wide lock.

transformers resolves its top-level names lazily, importing the submodule that holds each on its
first use. Two threads doing that at once can each wait for a module the other is importing;
Python breaks that deadlock by handing one of them a half-initialised module, and the import
fails ("cannot import name 'AutoConfig' from 'transformers'"). A job's model load (its config
read while a second thread loads the tokenizer), a worker's preload beside a job's load, and the
API's request threads all import them, so every import of a transformers or PEFT name in Tunery
goes through `hf_name`, and the loads that import model-specific modules on their first call hold
`HF_LOAD_LOCK` while they do.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

# Reentrant: a load holding it may resolve names itself.
HF_LOAD_LOCK = threading.RLock()


def hf_name(module: str, name: str) -> Any:
    """`from <module> import <name>`, made while no other thread imports from transformers."""
    with HF_LOAD_LOCK:
        return getattr(importlib.import_module(module), name)
