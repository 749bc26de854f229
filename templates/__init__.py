"""Jinja templates: the only place file formats are spelled out."""
