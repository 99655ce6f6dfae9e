"""The library imports without the optional extras and without the lab; it ships py.typed."""

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


def test_library_imports_no_lab_plotting_or_framework_module():
    # The lab (gaflab) and the frameworks are installed here (the dev extra), so an import of
    # them from the library would succeed silently: look at what importing gaf pulled in.
    # (tqdm is not in the list: torch.hub imports it whenever it is installed.)
    code = (
        "import sys\n"
        "import gaf, gaf.collector, gaf.training, gaf.micrograds.vmap, gaf.core.measures\n"
        "import gaf.thresholds, gaf.distributed, gaf.faults, gaf.controls\n"
        "heavy = ('gaflab', 'matplotlib', 'lightning', 'pytorch_lightning',\n"
        "         'transformers', 'accelerate', 'tensorboard')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import gaf imported {out.stdout.strip()}"


def test_lab_is_a_separate_package():
    import gaflab

    assert Path(gaflab.__file__).parent.name == "gaflab"
    assert not (Path(gaf.__file__).parent / "experiments").exists()


def test_py_typed_marker_is_shipped():
    assert (Path(gaf.__file__).parent / "py.typed").is_file()
