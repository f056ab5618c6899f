"""Fill jinja2 templates (autoescaped) into self-contained HTML reports."""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from ..derivatives import write_text

LOGGER = logging.getLogger(__name__)


def environment() -> jinja2.Environment:
    folder = files("pipeline.templates")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, context: dict[str, Any]) -> str:
    return environment().get_template(template).render(**context)


def write_report(path: Path, template: str, context: dict[str, Any]) -> Path | None:
    """Render and write a report; a failure is logged, never fatal to the outputs it describes."""
    try:
        return write_text(path, render(template, context))
    except (jinja2.TemplateError, OSError, TypeError, ValueError) as exc:
        LOGGER.error("Could not write the report %s: %s", path, exc)
        return None
