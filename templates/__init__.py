"""Jinja2 report templates and their inlined CSS, installed as ``pipeline.templates``."""
