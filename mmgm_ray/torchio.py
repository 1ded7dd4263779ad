"""Reading torch files the safe way, with one line saying what a refused file is.

Every torch file mmgm reads (model artifacts, training checkpoints, block checkpoints) goes through
:func:`load_weights_only`: ``torch.load(weights_only=True)``, so a file holding pickled code is
refused, never run. torch's own message for such a file advises retrying with ``weights_only=False``
(which would run the code); mmgm says what the file is instead.
"""
from __future__ import annotations

import io
import pickle
import re
from typing import Any

import torch

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # the code object torch refused, in either of its messages


def load_weights_only(data: bytes, what: str) -> Any:
    """``torch.load(weights_only=True, map_location="cpu")`` of ``data``; ValueError naming ``what``
    (e.g. "model artifact runs/x/model.pt") when the bytes are not a plain-tensor torch file."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = _GLOBAL.search(str(e))
        detail = f" (it references {m.group(1)})" if m else ""
        raise ValueError(f"{what} holds pickled Python objects{detail}: it is not a file mmgm wrote, and mmgm never "
                         f"unpickles code (loading it could run anything)") from e
    except Exception as e:  # noqa: BLE001 - zip, key and EOF errors all mean "not a whole torch file"
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise ValueError(f"{what} is not a readable torch file: truncated or another format "
                         f"({type(e).__name__}: {first})") from e
