"""`nuwa_paper`: Nüwa with the paper's fixed split, whatever calibrated plans the model directory holds.

`nuwa` runs a calibrated plan when the model has one for the request's task and budget (`models/plans.py`);
`nuwa_paper` never does, so the published split (K1, K2 = K1 / 7 at the middle layer; Qwen2.5-VL's table) stays
reachable by name and the retention study can put the two side by side. Plan and selection are `nuwa`'s own.
"""

from __future__ import annotations

from models.methods.nuwa import Nuwa


class NuwaPaper(Nuwa):
    """`nuwa` under another name: the runner resolves calibrated plans for `nuwa` only."""

    name = "nuwa_paper"


METHOD = NuwaPaper()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "NuwaPaper"]
