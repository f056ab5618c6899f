"""Nipype interface over :func:`pipeline.bids.audit.audit_t1w`."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..bids.audit import audit_t1w


class _AuditImageInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the anatomical image (any kind of pipeline.kinds) in BIDS_DIR")
    bids_dir = Directory(exists=True, mandatory=True, desc="root of the BIDS dataset")
    metadata = traits.Dict(desc="sidecar metadata of the image")


class _AuditImageOutputSpec(TraitedSpec):
    out_record = File(exists=True, desc="the audit record (JSON)")
    readable = traits.Bool(desc="whether the image could be read")


class AuditImage(SimpleInterface):
    """Audit one anatomical image: hashes, header, orientation, intensities and flags."""

    input_spec = _AuditImageInputSpec
    output_spec = _AuditImageOutputSpec

    def _run_interface(self, runtime):
        record = audit_t1w(
            Path(self.inputs.in_file),
            bids_dir=Path(self.inputs.bids_dir),
            metadata=dict(self.inputs.metadata or {}),
        )
        out = Path(runtime.cwd) / "audit.json"
        out.write_text(json.dumps(record, indent=2))
        self._results["out_record"] = str(out)
        self._results["readable"] = record["readable"]
        return runtime
