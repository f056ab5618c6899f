"""Brain extraction in a helper interpreter that loads deepbet's networks once.

torch's OpenMP pool deadlocks in a forked child once the parent has used it, and Nipype's MultiProc
workers are forked; starting torch costs ~3 s per interpreter. So the networks run in one fresh
interpreter per bidsdl process, ``python -m pipeline.interfaces.brain_service``, started by the main
process as the participant level begins (:func:`process_helper`): its start overlaps reading and
validating the dataset and the first steps, it loads the networks once, and the brain-extraction
nodes of every worker send it their requests (one at a time, each with its thread count) over a
local socket. A node given no helper (a
workflow run outside the participant level) uses, or starts, its own process's.

The helper exits when its standard input closes or its parent is gone, that is when the process that
started it ends, however it ends: it never outlives its run.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import IO, Any

from ..errors import BidsdlError, InputDataError
from ..processes import child_environment, die_with_launcher

_MODULE = "pipeline.interfaces.brain_service"


def _new_address() -> str:
    """A fresh socket address: Linux's abstract namespace (no file, no path-length limit), else a file."""
    if sys.platform.startswith("linux"):
        return f"abstract:bidsdl-brain-{os.getpid()}-{secrets.token_hex(6)}"
    return "unix:" + str(Path(tempfile.mkdtemp(prefix="bidsdl-")) / "brain.sock")


def _socket(address: str) -> str:
    kind, _, name = address.partition(":")
    return "\0" + name if kind == "abstract" else name


class Helper:
    """A started helper: its process and its contact (``<address>#<key>``, what nodes are given).

    ``device`` (``cpu``, ``cuda``, ``auto``): where it loads the networks before the first request.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.key = secrets.token_hex(16)
        self.address = _new_address()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the helper
        self._owner = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-m", _MODULE],
            env=child_environment(),
            stdin=subprocess.PIPE,
            stderr=self._stderr,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(f"{self.address}#{self.key}#{device}\n")
        self.process.stdin.flush()

    @property
    def contact(self) -> str:
        return f"{self.address}#{self.key}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return "\n".join(lines[-5:])

    def close(self) -> None:
        """End the helper (it exits when its input closes); only the process that started it may."""
        if self._owner != os.getpid() or self.process.stdin is None or self.process.stdin.closed:
            return
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_HELPERS: dict[tuple[int, str], Helper] = {}


def process_helper(device: str = "cpu") -> Helper:
    """This process's helper for ``device``, started on first use and kept until the process ends (a
    forked child's inherited one is not its own)."""
    key = (os.getpid(), device)
    helper = _HELPERS.get(key)
    if helper is None or not helper.alive():
        helper = _HELPERS[key] = Helper(device)
        atexit.register(helper.close)
    return helper


def extract(
    in_file: Path, out_dir: Path, *, name: str, num_threads: int, device: str, helper: str | None = None
) -> dict[str, str]:
    """Brain-extract ``in_file`` (RAS) into ``out_dir``: paths of ``mask`` and ``record``.

    ``name`` is what messages call the image (its BIDS file name); ``helper`` the contact of a running
    helper (:attr:`Helper.contact`), or None to use this process's own.
    """
    local = None if helper else process_helper(device)
    address, _, key = (helper or local.contact).partition("#")  # type: ignore[union-attr]
    request = {
        "in_file": str(in_file), "out_dir": str(out_dir), "name": name, "num_threads": num_threads, "device": device
    }  # fmt: skip
    try:
        with _connect(address, key) as connection:
            connection.send(request)
            answer = connection.recv()
    except (OSError, EOFError) as exc:
        tail = local.stderr_tail() if local else ""
        raise RuntimeError(
            f"the brain-extraction helper did not answer ({exc}); it may have been killed (out of memory?). {tail}"
        ) from exc
    if answer["ok"]:
        return answer["outputs"]
    if answer.get("kind") == "InputDataError":
        raise InputDataError(answer["error"])
    raise RuntimeError(answer["error"])


def _connect(address: str, key: str, wait_s: float = 120.0) -> Any:
    """A connection to the helper, waiting while it starts (its socket appears within a second)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Client(_socket(address), family="AF_UNIX", authkey=bytes.fromhex(key))
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _resolve(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _handle(request: dict[str, Any]) -> dict[str, str]:
    """The helper's work for one request: load, extract (pure), save the mask and its record."""
    import nibabel as nib
    import numpy as np
    import torch

    from ..ops import brain_extraction

    if torch.get_num_threads() != request["num_threads"]:
        torch.set_num_threads(max(1, int(request["num_threads"])))
    in_file, out_dir = Path(request["in_file"]), Path(request["out_dir"])
    device = _resolve(request["device"])
    img = nib.Nifti1Image.from_filename(in_file)
    extractor = brain_extraction.load_extractor(device)
    mask, record = brain_extraction.extract_brain(
        np.asanyarray(img.dataobj, dtype=np.float32), extractor, name=request.get("name", in_file.name)
    )
    out = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    out.set_data_dtype(np.uint8)
    out.header.set_xyzt_units("mm")
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    mask_path = out_dir / "brain_mask.nii"
    out.to_filename(mask_path)
    zooms = img.header.get_zooms()[:3]
    record = {
        **brain_extraction.provenance(),
        **record,
        "VolumeMl": round(float(mask.sum() * np.prod(zooms)) / 1000, 3),
        "Device": device,
    }
    record_path = out_dir / "brain_extraction.json"
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return {"mask": str(mask_path), "record": str(record_path)}


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request: the outputs, or the error (its kind and message)."""
    try:
        return {"ok": True, "outputs": _handle(request)}
    except BidsdlError as exc:
        return {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
    except Exception as exc:  # reported to the node, which fails with it
        return {"ok": False, "kind": type(exc).__name__, "error": f"{exc}\n{traceback.format_exc()}"}


def _exit_when_closed(stream: IO[str]) -> None:
    stream.read()  # returns at end of file: the process that started the helper has ended
    os._exit(0)


def _exit_when_orphaned(parent: int) -> None:
    # forked children of the parent hold its end of the pipe too: watch the parent itself as well
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(control: IO[str]) -> None:
    """The helper: listen, load the networks while the first requests queue, answer one at a time."""
    address, key, device = control.readline().strip().split("#")
    with Listener(_socket(address), family="AF_UNIX", backlog=64, authkey=bytes.fromhex(key)) as listener:
        threading.Thread(target=_exit_when_closed, args=(control,), daemon=True).start()
        threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
        from ..ops import brain_extraction

        with contextlib.suppress(Exception):  # the first request reports what is wrong
            brain_extraction.load_extractor(_resolve(device))  # while the first requests queue

        while True:
            try:
                connection = listener.accept()
            except OSError:  # a client that failed authentication or went away
                continue
            with connection:
                try:
                    connection.send(answer(connection.recv()))
                except (OSError, EOFError):  # the node's process ended meanwhile
                    continue


if __name__ == "__main__":
    die_with_launcher()
    serve(sys.stdin)
