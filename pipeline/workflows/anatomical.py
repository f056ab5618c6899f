"""Per-image anatomical workflows."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..interfaces.audit import AuditT1w
from ..interfaces.derivatives import DerivativesSink


def init_anat_audit_wf(*, bids_dir: Path, output_dir: Path, name: str = "anat_audit_wf") -> pe.Workflow:
    """Audit one T1w image and save the record as ``..._desc-audit_T1w.json``.

    Parameters
    ----------
    bids_dir
        Root of the BIDS dataset (read only).
    output_dir
        Root of the derivatives dataset.
    name
        Workflow name.

    Inputs
    ------
    t1w
        Path of the T1w image in ``bids_dir``.
    metadata
        Its sidecar metadata (dict).

    Outputs
    -------
    audit_record
        The record in the working folder.
    readable
        Whether the image could be read.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["t1w", "metadata"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["audit_record", "readable"]), name="outputnode")
    audit = pe.Node(AuditT1w(bids_dir=str(bids_dir)), name="audit")
    ds_audit = pe.Node(
        DerivativesSink(base_directory=str(output_dir), desc="audit", suffix="T1w"),
        name="ds_audit",
        run_without_submitting=True,
        overwrite=True,  # always re-save: cheap, and restores a deleted output
    )
    workflow.connect(
        [
            (inputnode, audit, [("t1w", "in_file"), ("metadata", "metadata")]),
            (inputnode, ds_audit, [("t1w", "source_file")]),
            (audit, ds_audit, [("out_record", "in_file")]),
            (audit, outputnode, [("out_record", "audit_record"), ("readable", "readable")]),
        ]
    )
    return workflow
