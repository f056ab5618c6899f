"""Brain extraction (deepbet) through bidsdl's wrapper and helper: real networks on small images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import InputDataError
from pipeline.interfaces import brain_service
from pipeline.ops import brain_extraction


def test_networks_are_found_in_the_installed_wheel_and_hashed():
    files = brain_extraction.network_files()
    assert set(files) == {"mask", "box"} and all(path.is_file() for path in files.values())
    hashes = brain_extraction.network_hashes()
    assert all(len(h) == 64 for h in hashes.values()) and hashes["mask"] != hashes["box"]
    record = brain_extraction.provenance()
    assert record["Software"] == "deepbet" and record["Version"] == "1.0.2" and record["NetworkSHA256"] == hashes


def test_bidsdl_never_imports_the_gui_nor_the_top_level_data_folder():
    """deepbet's wheel installs a GUI package and a top-level ``data`` folder; neither is imported."""
    code = (
        "import sys, numpy as np\n"
        "from pipeline.ops import brain_extraction\n"
        "import pipeline.interfaces.preprocess, pipeline.workflows.anatomical\n"
        "brain_extraction.load_extractor('cpu')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('customtkinter', 'darkdetect', 'data', 'tkinter')"
        " or m.startswith('deepbet.ui')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_extraction_of_a_sample_head_matches_its_true_brain(tmp_path):
    from tests.unit.test_ops import _head_with_neck

    prepared, mask, _ = _head_with_neck(3)
    path = tmp_path / "t1w_ras.nii"
    prepared.to_filename(path)
    outputs = brain_service.extract(path, tmp_path, name="sub-01_T1w.nii.gz", num_threads=2, device="cpu")
    found = np.asanyarray(nib.load(outputs["mask"]).dataobj) > 0
    truth = np.asanyarray(mask.dataobj) > 0
    assert (found & truth).sum() / truth.sum() >= 0.99  # recall
    assert (found & ~truth).sum() / found.sum() <= 0.05  # leak
    record = json.loads((tmp_path / "brain_extraction.json").read_text())
    assert record["NetworkSHA256"] == brain_extraction.network_hashes() and record["Device"] == "cpu"
    assert record["VolumeMl"] == pytest.approx(found.sum() * np.prod(prepared.header.get_zooms()) / 1000, rel=1e-3)


def test_no_brain_to_find_is_a_clear_error(tmp_path):
    flat = tmp_path / "flat.nii"
    nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)).to_filename(flat)
    with pytest.raises(InputDataError, match=r"sub-09_T1w\.nii\.gz: the image is constant"):
        brain_service.extract(flat, tmp_path, name="sub-09_T1w.nii.gz", num_threads=1, device="cpu")
    speck = tmp_path / "speck.nii"  # one bright voxel: deepbet's box finder finds nothing
    data = np.zeros((40, 40, 40), np.float32)
    data[20, 20, 20] = 100
    nib.Nifti1Image(data, np.diag([4.0, 4, 4, 1])).to_filename(speck)
    with pytest.raises(InputDataError, match=r"found no brain in this image\. Is it a T1-weighted image of a head"):
        brain_service.extract(speck, tmp_path, name="sub-09_T1w.nii.gz", num_threads=1, device="cpu")


def test_the_helper_serves_by_its_contact_and_ends_with_its_process(tmp_path):
    """Nodes reach the process's helper by its contact; the helper exits when its process ends, even by
    SIGKILL (its input closes), and a forked child's inherited helper is not the child's."""
    from tests.unit.test_ops import _head_with_neck

    prepared, _, _ = _head_with_neck(4)
    prepared.to_filename(tmp_path / "t1w_ras.nii")
    helper = brain_service.process_helper("cpu")
    assert brain_service.process_helper("cpu") is helper  # once per process
    outputs = brain_service.extract(tmp_path / "t1w_ras.nii", tmp_path, name="x", num_threads=1, device="cpu",
                                    helper=helper.contact)  # fmt: skip
    assert nib.load(outputs["mask"]).shape == prepared.shape
    code = (
        "import os, sys, time\n"
        "from pipeline.interfaces import brain_service\n"
        "print(brain_service.process_helper('cpu').process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}") and _state(child) != "Z":
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or _state(child) == "Z"


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
