"""The Dockerfile read as (INSTRUCTION, arguments) pairs, shared by the tests of it."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments and blanks dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def stages(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """The instructions grouped by build stage (each starting with its FROM)."""
    out: list[list[tuple[str, str]]] = []
    for instr, args in instructions(path):
        if instr == "FROM":
            out.append([])
        if out:
            out[-1].append((instr, args))
    return out
