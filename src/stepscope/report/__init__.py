"""Figures (matplotlib) and the self-contained HTML report of step maps and their diagnosis."""

from .html import build_report_html, render_report

__all__ = ["build_report_html", "render_report"]
