"""Moved to ``mesajax.report.analyses`` (kept so ``mesajax.report.report`` keeps working until it
imports the new module directly)."""
from mesajax.report.analyses import HOW_TO_READ, findings, make_figures, report_section  # noqa: F401
