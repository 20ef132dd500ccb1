"""What a bug report or a model card needs to know about the software (and, for bug reports, the machine) a run used.

`saeft env` prints `environment_info()`; model cards list `framework_versions()`, the same packages.
"""

from __future__ import annotations

import importlib.metadata
import platform

#: The packages saeft-hf runs on, by distribution name, in the order they are shown.
FRAMEWORKS: tuple[str, ...] = (
    "torch", "transformers", "datasets", "peft", "accelerate", "huggingface_hub", "safetensors",
)
#: Optional extras, shown only by `saeft env` (a missing one is normal).
OPTIONAL: tuple[str, ...] = ("deepspeed", "sae-lens")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def framework_versions() -> dict[str, str]:
    """{"python": ..., "saeft-hf": ..., "torch": ..., "transformers": ..., ...}: the versions a run depends on.

    saeft-hf's own is the imported code's `__version__` (an editable checkout may differ from the installed metadata).
    """
    from . import __version__

    return {"python": platform.python_version(), "saeft-hf": __version__,
            **{name: _version(name) for name in FRAMEWORKS}}


def _accelerator() -> dict[str, str]:
    import torch

    info: dict[str, str] = {}
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        # One line per distinct model, "2 x NVIDIA H100 80GB HBM3", as people paste it.
        shown = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
        info["CUDA available"] = f"True ({shown})"
        info["CUDA version (torch build)"] = str(torch.version.cuda or torch.version.hip)
    else:
        info["CUDA available"] = "False"
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    info["accelerator"] = accelerator.type if accelerator is not None else "none (CPU only)"
    return info


def _accelerate_config() -> str:
    """The path of the default `accelerate config` file, or that there is none (then `accelerate launch` uses
    its defaults unless --config_file is given)."""
    import os

    from accelerate.commands.config import default_config_file

    return default_config_file if os.path.isfile(default_config_file) else "not found (defaults)"


def environment_info() -> dict[str, str]:
    """Everything `saeft env` prints, as labelled strings: platform, python, the framework and optional package
    versions, the accelerators torch sees and the default accelerate config."""
    versions = framework_versions()
    info = {"platform": platform.platform(), "python": versions.pop("python"), **versions}
    info.update({name: _version(name) for name in OPTIONAL})
    info.update(_accelerator())
    info["accelerate default config"] = _accelerate_config()
    return info


def format_environment(info: dict[str, str]) -> str:
    """The copy-pasteable block of `saeft env`."""
    lines = ["Copy-paste the following information when reporting an issue:", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    return "\n".join(lines)
