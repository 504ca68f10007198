"""The paper's systems (Table 1) and the K ablation (Table 3), defined once, as data.

Every recipe, report and table reads this; nothing else spells out what a system is."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SystemSpec:
    """One row of the paper's Table 1 / Table 3."""

    name: str
    with_sed: bool  # descriptors in the caption (pre-training and post-training)
    domain_sft: bool  # post-train on the target corpus' train split
    selection_ratio: float | None  # CEM-based selection: share kept (None: no selection)
    rectify: bool  # RL SED rectification during post-training
    num_policies: int = 6  # K (only with rectify)
    paper_iemocap: float | None = None  # the paper's accuracy (%), for reports
    paper_meld: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sys(n, sed, sft, ratio, rect, iemocap, meld, k=6):
    return SystemSpec(f"sys{n}", sed, sft, ratio, rect, k, iemocap, meld)


SYSTEMS: dict[str, SystemSpec] = {
    s.name: s
    for s in [
        _sys(1, False, False, None, False, 63.01, 48.73),
        _sys(2, False, True, None, False, 73.65, 56.29),
        _sys(3, True, False, None, False, 65.19, 51.53),
        _sys(4, True, True, None, False, 78.08, 60.81),
        _sys(5, True, True, 0.9, False, 78.40, 62.04),
        _sys(6, True, True, 0.8, False, 78.89, 61.92),
        _sys(7, True, True, 0.7, False, 77.68, 60.81),
        _sys(8, True, True, 0.6, False, 75.02, 58.13),
        _sys(9, True, True, None, True, 79.85, 62.96),
        _sys(10, True, True, 0.9, True, 80.98, 64.11),
        _sys(11, True, True, 0.8, True, 80.66, 63.77),
        _sys(12, True, True, 0.7, True, 78.24, 61.46),
        _sys(13, True, True, 0.6, True, 75.66, 58.51),
    ]
}
# Table 3: Sys. 10's setting with K = 2, 4, 6, 8, 10 (V3 is Sys. 10 itself).
for _i, (_k, _ie, _me) in enumerate([(2, 79.37, 62.69), (4, 79.94, 63.04), (6, 80.98, 64.11), (8, 81.06, 63.69), (10, 80.26, 63.57)], 1):
    SYSTEMS[f"v{_i}"] = SystemSpec(f"v{_i}", True, True, 0.9, True, _k, _ie, _me)


def get_system(name: str | int) -> SystemSpec:
    key = str(name).lower()
    if key.isdigit():
        key = f"sys{key}"
    if key not in SYSTEMS:
        raise KeyError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    return SYSTEMS[key]
