"""Commissioning a model on the clinic's past patients: `[[pacs]]` query/retrieve (pacs.py), the clinical
reference of a study (reference.py), the run (run.py) and what it writes (report.py)."""
