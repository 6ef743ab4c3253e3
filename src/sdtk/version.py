"""sdtk's version: one module of its own, so that what records it (lineage, metadata, reports)
need not import the package facade (`sdtk/__init__.py`). Equal to pyproject.toml's version
(tests/test_startup.py checks)."""
__version__ = "0.1.0"
