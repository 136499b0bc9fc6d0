"""The package and its stubs type-check (mypy), so the .pyi files stay true
to the code that uses them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_package_type_checks():
    pytest.importorskip("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary",
         os.path.join(ROOT, "python", "bitshard")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_user_code_type_checks(tmp_path):
    """A user's script against the installed package's stubs."""
    pytest.importorskip("mypy")
    script = tmp_path / "user.py"
    script.write_text(
        "import numpy as np\n"
        "import bitshard\n"
        "rot: bitshard.Rotation = bitshard.build_rq_rotation(64, num_bits=2)\n"
        "ds = bitshard.dataset(np.zeros((10, 64), np.float32))\n"
        "seg: bitshard.SegmentHandle = ds.create_index_uncommitted('vector', 'IVF_RQ',\n"
        "    ivf_centroids=np.zeros((1, 64), np.float32), rq_rotation=rot)\n"
        "n: int = seg.num_rows\n"
    )
    out = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", str(script)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("import bitshard\nx: str = bitshard.build_rq_rotation(64).dimension\n")
    out = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "Incompatible types" in out.stdout
