"""The public surface, and that ``import emakit`` pulls in nothing but torch."""

import subprocess
import sys

import emakit

OPTIONAL = [
    "safetensors",
    "tqdm",
    "matplotlib",
    "tensorboard",
    "lightning",
    "deepspeed",
    "diffusers",
    "timm",
    "ema_pytorch",
    "torch_ema",
    "scipy",
    "sklearn",
    "numpy",
]


def test_import_pulls_no_optional_dependency():
    # torch itself imports some of these (tqdm, numpy) when installed: count only what emakit adds.
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import emakit, emakit.schedules, emakit.kernels, emakit.cli\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        f"print(','.join(sorted(m for m in new if m in {OPTIONAL!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_works_with_every_optional_dependency_blocked():
    code = (
        "import sys\n"
        f"for m in {OPTIONAL!r}: sys.modules[m] = None  # any import of them raises ImportError\n"
        "import emakit, emakit.schedules, emakit.kernels, emakit.cli\n"
        "import torch\n"
        "m = torch.nn.Linear(2, 2); e = emakit.EMA(m, decay=0.9); e.update(); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_names_have_docstrings():
    for name in emakit.__all__:
        obj = getattr(emakit, name)
        if name != "__version__":
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
    for name in emakit.schedules.__all__:
        obj = getattr(emakit.schedules, name)
        if callable(obj):
            assert obj.__doc__, name


def test_cli_entry_points():
    for argv in ([sys.executable, "-m", "emakit", "--version"],):
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"emakit {emakit.__version__}"


def test_submodules_are_attributes_loaded_on_first_use():
    # The docs write emakit.migrate.load(...) after a bare `import emakit`; that must neither fail nor load
    # migrate (or any optional dependency) before it is used.
    code = (
        "import sys, emakit\n"
        "lazy = [m for m in ('emakit.migrate', 'emakit.planning', 'emakit.verify') if m in sys.modules]\n"
        "print(lazy, callable(emakit.migrate.load), callable(emakit.planning.plan), 'verify' in dir(emakit))\n"
        "try:\n    emakit.no_such_thing\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[] True True True", "module 'emakit' has no attribute 'no_such_thing'"]
