"""bitshard's comparison harness: bitshard against pylance, FAISS, rabitqlib and
exact search on the same vectors, in one run. ``python -m bench --help``."""
