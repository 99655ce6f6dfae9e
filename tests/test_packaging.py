"""The core imports without the optional experiment extras, and the package ships py.typed."""

import subprocess
import sys
from pathlib import Path

import gaf


def test_core_imports_without_optional_extras():
    # Setting a module to None in sys.modules makes any import of it raise ImportError.
    code = (
        "import sys\n"
        "for name in ('matplotlib', 'tqdm', 'rich', 'tensorboard'):\n"
        "    sys.modules[name] = None\n"
        "import gaf, gaf.collector, gaf.training, gaf.micrograds.vmap, gaf.core.measures\n"
        "import gaf.thresholds, gaf.distributed\n"
        "import torch\n"
        "r = gaf.filter_gradients(torch.eye(3), tau=2.0)\n"
        "assert r.num_accepted == 3\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_py_typed_marker_is_shipped():
    assert (Path(gaf.__file__).parent / "py.typed").is_file()
