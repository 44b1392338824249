"""Collective traffic read from a compiled (SPMD-partitioned) HLO module.

For each collective instruction we take its per-device result size and the
size n of its replica groups, and count the bytes one device sends in a ring
algorithm: all-reduce 2(n-1)/n x size, all-gather (n-1)/n x result,
reduce-scatter (n-1)/n x operand (= (n-1) x result), all-to-all (n-1)/n x
size, collective-permute the size. Collectives inside while loops count once per
iteration when the loop's trip count is known (scans over layers and
micro-batches: XLA's annotation, or a counter compared with a constant), once
otherwise (their number is `in_loops_of_unknown_trip_count`).
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(KINDS) + r")(?:-start)?\("
)
_WHILE = re.compile(r"while\(.*body=%?([\w.\-]+)")
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_COUNTER_BOUND = re.compile(r"ROOT .*compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT")
_CALLS = re.compile(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)")


def _bytes(shape_text: str) -> int:
    return sum(
        _BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
        for t, dims in _SHAPE.findall(shape_text)
    )


def _group_size(line: str, devices: int) -> int:
    groups = re.search(r"replica_groups=\{(\{[\d,]*\})", line)
    if groups:
        return max(1, len([x for x in groups.group(1).strip("{}").split(",") if x]))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
    return devices


def collective_bytes(hlo_text: str, devices: int) -> dict:
    """{kind: bytes sent per device per step}, and the counts of instructions."""
    computations, entry = _computations(hlo_text)
    multiplier, unknown = _multipliers(computations, entry)
    sent = dict.fromkeys(KINDS, 0)
    counts = dict.fromkeys(KINDS, 0)
    uncounted = 0
    for name, lines in computations.items():
        factor = multiplier.get(name, 0)
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match or factor == 0:
                continue
            result_shape, kind = match.group(1), match.group(2)
            n = _group_size(line, devices)
            if n <= 1:
                continue
            size = _bytes(result_shape)  # per device; operands are named, not shaped, in HLO text
            sent[kind] += factor * _ring_share(kind, n) * size
            counts[kind] += factor
            uncounted += name in unknown
    return {
        "bytes": {k: int(v) for k, v in sent.items()},
        "instructions": counts,
        "in_loops_of_unknown_trip_count": uncounted,
    }


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its lines} of an HLO module, and the entry's name."""
    computations, current = collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
        elif current is not None:
            computations[current].append(line)
    entry = next(
        (
            m.group(1)
            for m in map(_COMPUTATION.match, hlo_text.splitlines())
            if m and "ENTRY" in m.string
        ),
        None,
    )
    return computations, entry


def _multipliers(computations: dict, entry: str | None) -> tuple[dict[str, int], set[str]]:
    """The multiplier of each computation called from `entry`: the product of
    the trip counts of the loops around it; and the computations inside a loop
    of unknown trip count."""
    multiplier, unknown = {}, set()

    def visit(name, factor, in_unknown, seen=()):
        if name in seen or name not in computations:
            return
        multiplier[name] = multiplier.get(name, 0) + factor
        if in_unknown:
            unknown.add(name)
        for line in computations[name]:
            loop = _WHILE.search(line)
            trip = _trip_count(line, computations) if loop else None
            for callee in _CALLS.findall(line):
                inner, inner_unknown = factor, in_unknown
                if loop and callee == loop.group(1):
                    inner = factor * (trip or 1)
                    inner_unknown = in_unknown or trip is None
                visit(callee, inner, inner_unknown, (*seen, name))

    if entry:
        visit(entry, 1, False)
    return multiplier, unknown


def _trip_count(while_line: str, computations: dict) -> int | None:
    """A while loop's trip count: XLA's known_trip_count where it annotates one
    (the CPU compiler), else a condition `counter < constant N` (the TPU
    compiler leaves scans unannotated; JAX's scan counters start at 0)."""
    known = _TRIP.search(while_line)
    if known:
        return int(known.group(1))
    condition = _CONDITION.search(while_line)
    lines = computations.get(condition.group(1), []) if condition else []
    bound = next(filter(None, map(_COUNTER_BOUND.search, lines)), None)
    if bound is None:
        return None
    constant = re.compile(rf"%?{re.escape(bound.group(1))} = s32\[\]\S* constant\((\d+)\)")
    value = next(filter(None, map(constant.search, lines)), None)
    return int(value.group(1)) if value else None


def _ring_share(kind: str, n: int) -> float:
    """Bytes one device sends per byte of the result, for a ring over `n` devices."""
    return {
        "all-reduce": 2 * (n - 1) / n,
        "reduce-scatter": n - 1,  # the operand is n x the result
        "collective-permute": 1.0,
    }.get(kind, (n - 1) / n)
