"""The paper's systems (Table 1), the K ablation (Table 3), the brackets that bound them, and the
paper's claims, defined once, as data.

Every recipe, report and table reads this; nothing else spells out what a system is."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .trainers.rectify_config import DEFAULT_NUM_POLICIES


@dataclass(frozen=True)
class SystemSpec:
    """One row of the paper's Table 1 / Table 3."""

    name: str
    with_sed: bool  # descriptors in the caption (pre-training and post-training)
    domain_sft: bool  # post-train on the target corpus' train split
    selection_ratio: float | None  # CEM-based selection: share kept (None: no selection)
    rectify: bool  # RL SED rectification during post-training
    num_policies: int = DEFAULT_NUM_POLICIES  # K (only with rectify)
    paper_iemocap: float | None = None  # the paper's accuracy (%), for reports
    paper_meld: float | None = None
    # brackets (not in the paper): the descriptors post-training reads ("auto": the annotation; "truth":
    # the ground truth, oracle labels; "pseudo": the pre-trained SLM's own predictions) and how the kept
    # share is chosen ("cem": the CEM's confidence; "oracle": the rows with the most right annotated labels)
    sed_labels: str = "auto"
    selection: str = "cem"

    @property
    def is_bracket(self) -> bool:
        return self.sed_labels != "auto" or self.selection != "cem"

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
for _i, (_k, _ie, _me) in enumerate(
    [(2, 79.37, 62.69), (4, 79.94, 63.04), (6, 80.98, 64.11), (8, 81.06, 63.69), (10, 80.26, 63.57)], 1
):
    SYSTEMS[f"v{_i}"] = SystemSpec(f"v{_i}", True, True, 0.9, True, _k, _ie, _me)


# Brackets: what selection and rectification could reach on a corpus with ground truth (DESIGN section 2).
for _spec in (
    SystemSpec("oracle_labels", True, True, None, False, sed_labels="truth"),
    SystemSpec("pseudo_labels", True, True, None, False, sed_labels="pseudo"),
    SystemSpec("oracle_sel90", True, True, 0.9, False, selection="oracle"),
    SystemSpec("oracle_sel80", True, True, 0.8, False, selection="oracle"),
):
    SYSTEMS[_spec.name] = _spec
BRACKETS: tuple[str, ...] = ("oracle_labels", "pseudo_labels", "oracle_sel90", "oracle_sel80")


@dataclass(frozen=True)
class Claim:
    """ "``better`` beats ``worse``": one ordering the paper reports (or a bracket against a system)."""

    better: str
    worse: str
    source: str  # where the claim comes from

    @property
    def label(self) -> str:
        return f"{_short(self.better)} > {_short(self.worse)}"


def _short(name: str) -> str:
    return name[3:] if name.startswith("sys") else name


def paper_claims(systems) -> list[Claim]:
    """The paper's orderings that the given systems can test: Sys. 2 > 1, 4 > 3, 4 > 2, 6 > 4,
    9 > 4, 10 > 4, Sys. 10 above every other of Sys. 4-13 run, Table 3's K ordering (IEMOCAP:
    K = 8 > 6 > 10 > 4 > 2, adjacent pairs), and each bracket against Sys. 4 (Sys. 6 for oracle
    selection at 80%)."""
    have = set(systems)
    pairs = [
        ("sys2", "sys1"),
        ("sys4", "sys3"),
        ("sys4", "sys2"),
        ("sys6", "sys4"),
        ("sys9", "sys4"),
        ("sys10", "sys4"),
    ]
    claims = [Claim(a, b, "Table 1") for a, b in pairs]
    # 10 > 4 is already a Table 1 pair (the de-duplication below keeps that one)
    claims += [Claim("sys10", f"sys{n}", "Table 1: Sys. 10 best") for n in range(4, 14) if n != 10]
    k_order = sorted((n for n in SYSTEMS if n.startswith("v")), key=lambda n: -(SYSTEMS[n].paper_iemocap or 0))
    claims += [Claim(a, b, "Table 3 (IEMOCAP K ordering)") for a, b in zip(k_order, k_order[1:])]
    claims += [
        Claim("oracle_labels", "sys4", "bracket"),
        Claim("pseudo_labels", "sys4", "bracket"),
        Claim("oracle_sel90", "sys4", "bracket"),
        Claim("oracle_sel80", "sys6", "bracket"),
    ]
    seen, out = set(), []
    for c in claims:
        if c.better in have and c.worse in have and (c.better, c.worse) not in seen:
            seen.add((c.better, c.worse))
            out.append(c)
    return out


def get_system(name: str | int) -> SystemSpec:
    key = str(name).lower()
    if key.isdigit():
        key = f"sys{key}"
    if key not in SYSTEMS:
        raise KeyError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    return SYSTEMS[key]
