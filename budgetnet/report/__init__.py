"""``budgetnet report``: any study read after the fact (``study.py``) and written as pages (``pages.py``)."""
