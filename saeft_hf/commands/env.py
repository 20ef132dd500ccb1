"""`saeft env`: the versions and machine facts to paste into a bug report (like `trl env`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from saeft_hf.environment import environment_info, format_environment


def main(argv: Sequence[str]) -> dict[str, str]:
    parser = argparse.ArgumentParser(description="Print the platform, Python, saeft-hf and framework versions and the "
                                                 "accelerators torch sees, for bug reports.")
    parser.add_argument("--json", action="store_true", help="Print a JSON object instead of the copy-paste list.")
    args = parser.parse_args(list(argv))
    info = environment_info()
    print(json.dumps(info, indent=2) if args.json else format_environment(info))
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
