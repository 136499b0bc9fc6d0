"""The C library allocates only through src/alloc.h (overflow-checked sizes,
zero sizes as one byte, never realloc(p, 0)): no file in src/ calls malloc,
calloc or realloc itself."""

from __future__ import annotations

import os
import re

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "src")


def test_no_raw_allocation_outside_alloc_h():
    raw = re.compile(r"(?<![A-Za-z0-9_])(malloc|calloc|realloc)\s*\(")
    found = []
    for name in sorted(os.listdir(SRC)):
        if not name.endswith((".c", ".h")) or name == "alloc.h":
            continue
        with open(os.path.join(SRC, name)) as f:
            for no, line in enumerate(f, 1):
                if raw.search(line):
                    found.append(f"src/{name}:{no}: {line.strip()}")
    assert found == []
    # and the check itself sees a raw call
    assert raw.search("p = realloc(q, n);") and not raw.search("p = bs_realloc(q, n, 1);")
