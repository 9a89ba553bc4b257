"""The core is plain PyTorch: importing it never imports Ray (only raymtl.tune and raymtl.scale do)."""

import pkgutil
import subprocess
import sys

import raymtl

RAY_LAYER = ("raymtl.tune", "raymtl.scale")


def test_core_modules_do_not_import_ray():
    core = [
        m.name
        for m in pkgutil.walk_packages(raymtl.__path__, "raymtl.")
        if not m.name.startswith(RAY_LAYER) and not m.name.endswith("__main__")
    ]
    assert "raymtl.engine" in core and "raymtl.data.celeba" in core
    code = "import importlib, sys\n" + "".join(
        f"importlib.import_module({name!r})\n" for name in core
    )
    code += "print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_small_cnn_train_worker_does_not_import_torchvision():
    """Importing torchvision loads torch._dynamo (~1.3 s of CPU); every Ray Train worker, Tune
    trial and CLI process would pay it. It is imported only when a torchvision backbone or the
    MTL-UE generator is built."""
    code = (
        "import sys\n"
        "import raymtl.scale.train, raymtl.tune.cli, raymtl.unlearn.__main__, raymtl.victim\n"
        "from raymtl.models import create_model\n"
        "from raymtl.tasks import TaskSpec\n"
        "create_model('small_cnn', [TaskSpec('a', 'binary')], 3, 16)\n"
        "print('torchvision' in sys.modules)\n"
        "create_model('resnet18', [TaskSpec('a', 'binary')], 3, 16)\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
