"""gaf.integrations imports no framework until one of its submodules is imported."""

import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard")


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_integrations_package_imports_no_framework():
    code = (
        "import sys\n"
        "import gaf, gaf.integrations, gaf.integrations.common\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    assert run(code) == "[]"


def test_csv_logging_works_with_no_framework_installed(tmp_path):
    # A module set to None in sys.modules cannot be imported: as if it were not installed.
    code = (
        "import sys\n"
        f"for name in {FRAMEWORKS!r}:\n"
        "    sys.modules[name] = None\n"
        "import torch, gaf\n"
        "from gaf.integrations.tensorboard import StatsLogger\n"
        f"with StatsLogger({str(tmp_path)!r}, tensorboard=False) as log:\n"
        "    log.log_step(0, gaf.filter_gradients(torch.eye(2), tau=2.0))\n"
        "try:\n"
        f"    StatsLogger({str(tmp_path)!r})\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert "pip install 'gaf[tensorboard]'" in run(code)
    assert (tmp_path / "steps.csv").read_text().count("\n") == 2
