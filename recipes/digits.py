"""The digit-shift benchmark (the demo) on the bundled tiny CLIP, offline: `saeft demo`.

    python recipes/digits.py                         # the paper's comparison, one seed, outputs/demo (make demo)
    python recipes/digits.py --methods all --seeds 0 1 2 --output_dir outputs/digits-3seeds   # every method

The code (and its one parser) is `saeft_hf.commands.demo`; this file runs it from a clone.
"""

import sys

from saeft_hf.commands.demo import main

if __name__ == "__main__":
    main(sys.argv[1:])
