"""The container image, built and run for real: read-only, no network, a non-root user.

Skipped with the reason where no container engine works. The engine is ``podman`` when present, else
``docker`` (``BIDSDL_CONTAINER_ENGINE`` picks another); ``BIDSDL_CONTAINER_BUILD_ARGS`` adds build
options for the machine (``.ci/run`` sets them here: ``--pull=never``, the local wheel folder);
``BIDSDL_TEST_IMAGE`` tests an image built beforehand instead.
The produced file list is compared with ``tests/data/expected_outputs.txt`` (fMRIPrep's pattern);
``BIDSDL_UPDATE_EXPECTED=1`` rewrites that file from this run, to review in the diff.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import __version__
from tests.helpers import FAST, external_links, set_read_only

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = ROOT / "tests" / "data" / "expected_outputs.txt"
IMAGE = "localhost/bidsdl:test"
USER = "1234:1234"  # not the image's user, not root: as with docker run --user or Singularity


def _engine() -> tuple[str | None, str]:
    """The engine's command, or None and why not."""
    name = os.environ.get("BIDSDL_CONTAINER_ENGINE") or ("podman" if shutil.which("podman") else "docker")
    if shutil.which(name) is None:
        return None, f"no container engine: neither podman nor docker is on PATH ({name!r} tried)"
    try:
        info = subprocess.run([name, "info"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{name} does not answer: {exc}"
    if info.returncode != 0:
        return None, f"{name} info failed: {info.stderr.strip()[-300:]}"
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base is not None
    found = subprocess.run([name, "image", "inspect", base.group(1)], capture_output=True, timeout=60, check=False)
    if found.returncode != 0 and "--pull=never" in os.environ.get("BIDSDL_CONTAINER_BUILD_ARGS", ""):
        return (
            None,
            f"the base image {base.group(1)} is not in {name}'s storage (.ci/run prepares one where it can)",
        )
    return name, ""


ENGINE, WHY_NOT = _engine()
pytestmark = [pytest.mark.integration, pytest.mark.container, pytest.mark.skipif(ENGINE is None, reason=WHY_NOT)]


@functools.cache
def _is_podman() -> bool:
    version = subprocess.run([str(ENGINE), "--version"], capture_output=True, text=True, check=False).stdout
    return "podman" in version.lower()


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image from the repository (layer cache: only changed layers rebuild), or use the image
    ``BIDSDL_TEST_IMAGE`` names (CI builds it in an earlier job)."""
    if os.environ.get("BIDSDL_TEST_IMAGE"):
        return os.environ["BIDSDL_TEST_IMAGE"]
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    command = [
        str(ENGINE), "build", "-t", IMAGE,
        "--build-arg", f"REVISION={revision.strip() or 'unknown'}",
        *shlex.split(os.environ.get("BIDSDL_CONTAINER_BUILD_ARGS", "")),
        str(ROOT),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return IMAGE


def container_command(image: str, *args: str, mounts: dict[Path, str], user: str = USER) -> list[str]:
    """``docker run --rm --read-only --network none --user`` with ``mounts`` {host path: 'target[:ro]'}."""
    command = [str(ENGINE), "run", "--rm", "--read-only", "--network", "none", "--user", user]
    if not _is_podman():
        command += ["--tmpfs", "/tmp"]  # podman's --read-only mounts one already
    for host, target in mounts.items():
        command += ["-v", f"{host}:{target}"]
    return [*command, image, *args]


def run(image: str, *args: str, mounts: dict[Path, str], user: str = USER, timeout: float = 900):
    command = container_command(image, *args, mounts=mounts, user=user)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _writable(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def _file_list(out: Path, prefix: str) -> list[str]:
    """Produced files, with what changes from run to run (run IDs, the model's name) made generic."""
    names = []
    for path in out.rglob("*"):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel.startswith((".bidsdl", "logs/")) or "/log/" in rel:
            continue
        names.append(f"{prefix}/{re.sub(r'^models/[^/]+/', 'models/<model>/', rel)}")
    return sorted(names)


def test_image_runs_every_level_read_only_offline_as_any_user(image, tmp_path):
    data = _writable(tmp_path / "data")
    out, new_out = _writable(tmp_path / "out"), _writable(tmp_path / "new_out")

    done = run(image, "--version", mounts={})
    assert done.returncode == 0 and done.stdout.strip() == f"bidsdl {__version__}", done.stderr

    # the sample datasets, written by the image's own generator into a mounted folder
    for args in (
        ("/data/bids", "--subjects", "8", "--seed", "6", "--two-session-fraction", "0.25", "--voxel-scale", "3"),
        ("/data/new", "--subjects", "2", "--seed", "7", "--label-prefix", "ext", "--voxel-scale", "3"),
    ):
        done = run(image, "bidsdl-sample", *args, "--nprocs", "2", mounts={data: "/data"})
        assert done.returncode == 0, done.stderr
    bids, new = data / "bids", data / "new"
    set_read_only(bids)
    set_read_only(new)
    mounts = {bids: "/bids:ro", out: "/out"}

    done = run(image, "/bids", "/out", "participant", "--list-participants", mounts=mounts)
    labels = done.stdout.split()
    assert done.returncode == 0 and len(labels) == 8, done.stderr

    # participants 0 and 1 as two array tasks at once, the other six in one container
    common = ("--model-resolution", "4", "--warp-resolution", "4", "-w", "/out/.bidsdl_work")
    commands = [
        container_command(image, "/bids", "/out", "participant", "--participant-index", str(i), "--nprocs", "1",
                          *common, mounts=mounts)
        for i in (0, 1)
    ]  # fmt: skip
    tasks = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    for task in tasks:
        _, err = task.communicate(timeout=900)
        assert task.returncode == 0, err[-3000:]
    rest = run(image, "/bids", "/out", "participant", "--participant-label", *labels[2:], "--nprocs", "2", *common,
               mounts=mounts)  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-3000:]

    # group: a small, fast training
    done = run(image, "/bids", "/out", "group", *FAST, "--inputs", "T1w", "-w", "/out/.bidsdl_work", mounts=mounts)
    assert done.returncode == 0, done.stderr[-3000:]
    (package,) = (out / "models").iterdir()

    # participant --model on the new cohort, the package mounted read-only
    inference_mounts = {new: "/new:ro", new_out: "/new_out", out / "models": "/models:ro"}
    done = run(image, "/new", "/new_out", "participant", "--model", f"/models/{package.name}", "--model-resolution",
               "4", "--warp-resolution", "4", "--nprocs", "2", mounts=inference_mounts)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    # what was made: the expected files, owned by the user that ran the container
    produced = _file_list(out, "derivatives") + _file_list(new_out, "new_derivatives")
    if os.environ.get("BIDSDL_UPDATE_EXPECTED"):
        header = "# Files the container test makes (tests/integration/test_container.py); BIDSDL_UPDATE_EXPECTED=1 "
        header += "rewrites.\n"
        EXPECTED.write_text(header + "".join(f"{name}\n" for name in produced))
    expected = [ln for ln in EXPECTED.read_text().splitlines() if ln and not ln.startswith("#")]
    missing, unexpected = sorted(set(expected) - set(produced)), sorted(set(produced) - set(expected))
    assert not missing and not unexpected, f"missing: {missing}\nunexpected: {unexpected}"
    assert {p.stat().st_uid for p in out.rglob("*")} == {1234}

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": f"bidsdl:{__version__}"}
    for report in [*out.glob("sub-*.html"), *new_out.glob("sub-*.html"), out / "group.html"]:
        html = report.read_text()
        assert not external_links(html), report.name
        assert "data:image/png;base64," in html, report.name
    assert len(list(out.glob("sub-*.html"))) == 8
    group = (out / "group.html").read_text()
    assert "Dataset checks" in group and "Test" in group
    for report in new_out.glob("sub-*.html"):
        assert "Prediction" in report.read_text()
    predictions = list(new_out.glob("sub-*/**/*_prediction.json"))
    assert len(predictions) == 2
    assert json.loads(predictions[0].read_text())["models"][0]["content_sha256"]


def test_container_says_what_to_mount(image, tmp_path):
    """BIDS_DIR not mounted (66); OUTPUT_DIR mounted read-only or not mounted at all (73)."""
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    bids.chmod(0o755)
    out = _writable(tmp_path / "out")

    done = run(image, "/bids", "/out", "participant", mounts={out: "/out"})
    assert done.returncode == 66 and "-v /path/to/bids:/bids:ro" in done.stderr, done.stderr

    done = run(image, "/bids", "/out", "participant", mounts={bids: "/bids:ro", out: "/out:ro"})
    assert done.returncode == 73 and "OUTPUT_DIR /out cannot be created or written" in done.stderr, done.stderr
    assert "mount it writable" in done.stderr

    done = run(image, "/bids", "/derivatives", "participant", mounts={bids: "/bids:ro"})
    assert done.returncode == 73 and "is not a folder mounted from the host" in done.stderr, done.stderr
