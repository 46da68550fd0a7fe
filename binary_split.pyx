# cython: language_level=3, embedsignature=True
