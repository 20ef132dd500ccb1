"""The `saeft` command: one subcommand per recipe, each parsed by that recipe's own parser (no second parser).

    saeft train --config recipes/configs/imagenet_vit_b16.yaml --learning_rate 2e-5   # flags override the YAML
    saeft train --help                                  # every flag of that command
    accelerate launch -m saeft_hf.cli train --config ...   # or: accelerate launch $(which saeft) train ...
    saeft env                                           # versions for a bug report

Installed as a console script (`saeft = saeft_hf.cli:main`); `python -m saeft_hf.cli` and `python -m saeft_hf` are
the same command without the script.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

#: name -> (module with `main(argv)`, one line for `saeft --help`). The modules are imported only when run.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("saeft_hf.commands.train",
              "SAE-FT fine-tuning of a CLIP checkpoint, full or LoRA, with evaluation and WiSE-FT (the ImageNet recipe)"),
    "train-sae": ("saeft_hf.commands.train_sae", "train the SAE on a pre-trained CLIP's image embeddings"),
    "evaluate": ("saeft_hf.commands.evaluate",
                 "evaluate a saved run, a Hub model or a CLIP checkpoint on shift sets; sweep WiSE-FT"),
    "interpret": ("saeft_hf.commands.interpret", "the feature report: SAE features fine-tuning added and removed"),
    "demo": ("saeft_hf.commands.demo",
             "the offline shift benchmark: zero-shot, FT, WiSE-FT, SAE-FT (--methods all, --world fashion)"),
    "compare": ("saeft_hf.commands.compare",
                "a run's eval_results.json beside the numbers its config should reproduce (`expected:`)"),
    "env": ("saeft_hf.commands.env", "print versions and accelerators for a bug report"),
}


def usage() -> str:
    from saeft_hf import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: saeft <command> [flags]     (saeft-hf {__version__})", "",
             "Robust, interpretable fine-tuning of CLIP vision models with sparse autoencoders (SAE-FT).", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`saeft <command> --help` lists that command's flags. train, train-sae, evaluate and demo read a YAML",
              "file with --config FILE; flags given after it override its values.",
              "Several processes: accelerate launch [--config_file ...] -m saeft_hf.cli <command> [flags]"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `saeft <command> [flags]`; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from saeft_hf import __version__

        print(f"saeft-hf {__version__}")
        return 0
    if argv[0] == "help" and len(argv) > 1:  # `saeft help train` = `saeft train --help`
        argv = [argv[1], "--help"]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean `saeft {close[0]}`?" if close else ""
        print(f"saeft: unknown command {name!r}.{hint} Commands: {', '.join(COMMANDS)} (`saeft --help`).",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # argparse names the program after sys.argv[0]: show "saeft train" in usage lines and errors.
    program = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = f"saeft {name}"
    try:
        module.main(rest)
    finally:
        if sys.argv:
            sys.argv[0] = program
    return 0


if __name__ == "__main__":
    sys.exit(main())
