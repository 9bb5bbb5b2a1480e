"""Datasets on disk: what each is (``info``), how to read it (``read``), built-ins and image folders.

No torch here: the folder's decoding processes import ``datasets.decode`` through this package.
"""
