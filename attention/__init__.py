"""Generated Python code of the ``attention.v1`` protocol (see ``proto/generate.py``)."""
