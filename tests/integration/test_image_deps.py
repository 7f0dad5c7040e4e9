"""The Dockerfile's install step, replayed without Docker.

The builder stage's COPY sources are copied into a temporary folder and its
`pip install` runs there, with the stage's ENV, into a fresh virtualenv (standing in
for the image's /usr/local). The result must run `python -m resultbackend_operator`,
import every handler's dependency, and hold exactly the versions constraints.txt pins.
This needs the package index (like `docker build`), not the devstack.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dockerfile import DOCKERFILE, stages

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def builder_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the first stage."""
    all_stages = stages()
    assert len(all_stages) >= 2, "the Dockerfile is not multi-stage"
    return all_stages[0]


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in stage:
        if instr == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def copy_context(stage: list[tuple[str, str]], dest: Path) -> None:
    """Replay the stage's COPY instructions from the repository (the build context)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for instr, args in stage:
        if instr != "COPY":
            continue
        *sources, target = shlex.split(args)
        assert not any(s.startswith("--") for s in sources), f"unexpected COPY flags: {args}"
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"the Dockerfile copies {src}, which does not exist"
            if path.is_dir():
                shutil.copytree(path, dest / target, ignore=ignore, dirs_exist_ok=True)
            else:
                (dest / target).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / target / path.name)


def run(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        cmd, cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


@pytest.mark.timeout(900)
def test_dockerfile_install_step_gives_a_working_operator(tmp_path: Path) -> None:
    stage = builder_stage()
    m = re.search(r"python:(\d+)\.(\d+)", DOCKERFILE.read_text())
    assert m, "the Dockerfile names no python:X.Y base image"
    image_python = (int(m[1]), int(m[2]))
    assert sys.version_info[:2] == image_python, f"replay with the image's Python {image_python}"

    src = tmp_path / "src"
    src.mkdir()
    copy_context(stage, src)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))},
        **stage_env(stage),
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
    }

    pip_runs = [a for i, a in stage if i == "RUN" and a.startswith("pip install")]
    assert pip_runs, "the builder stage has no `RUN pip install`"
    for cmd in pip_runs:
        argv = shlex.split(cmd)
        # --prefix=/install is the image's /usr/local; here the virtualenv is.
        argv = [a for a in argv if not a.startswith("--prefix")]
        run([python, "-m", *argv], cwd=src, env=env, timeout=840)

    # Outside the repository, so only the installed package can be imported.
    runtime = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
    out = run([python, "-m", "resultbackend_operator", "--help"], cwd=tmp_path, env=runtime)
    assert "--all-namespaces" in out.stdout
    assert "--liveness" in out.stdout
    out = run([python, "-m", "resultbackend_operator", "--version"], cwd=tmp_path, env=runtime)
    assert "0.1.0" in out.stdout
    # --help stops before kopf is imported; the handlers import every runtime dependency.
    run([python, "-c", "import resultbackend_operator.handlers"], cwd=tmp_path, env=runtime)
    run([python, "-m", "pip", "check"], env=runtime)

    # Every installed distribution is pinned by constraints.txt, at that version, and
    # no dev tool came along.
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if m:
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    freeze = run([python, "-m", "pip", "freeze", "--all"], env=runtime).stdout.splitlines()
    installed = {}
    for line in freeze:
        name, sep, version = line.partition("==")
        if sep:
            installed[re.sub(r"[-_.]+", "-", name).lower()] = version
    installed.pop("resultbackend-operator", None)  # "name @ file://...", not pinned
    for tool in ("pip", "setuptools", "wheel"):
        installed.pop(tool, None)
    unpinned = {n: v for n, v in installed.items() if pins.get(n) != v}
    assert not unpinned, f"installed but not pinned (or pinned differently): {unpinned}"
    for dev_tool in ("pytest", "mypy", "ruff"):
        assert dev_tool not in installed, f"{dev_tool} is installed in the image"
