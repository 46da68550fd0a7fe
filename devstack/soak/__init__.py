"""The soak: hours of mixed loads, uploads and unlocks against the real processes with faults thrown in.

engine (the run: Soak, SoakConfig), client (the loader's routes as a client calls them), faults (how each
fault is thrown in and healed), rules (what each answer may be), report (the figures and the RESULT line).
Run by bench/soak.py and tests/faults/test_soak.py; see docs/soak.md.
"""
