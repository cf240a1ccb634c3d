"""The ``medtl`` command's shape: help is fast because building the parser imports no torch."""

import subprocess
import sys

from medtl.cli.predict import OUTPUT_FORMATS


def test_help_does_not_import_torch():
    code = ("import sys; from medtl.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'monai', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_predict_formats_match_the_result_table():
    from medtl.infer import FORMATS

    assert OUTPUT_FORMATS == FORMATS
