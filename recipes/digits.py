"""The digit-shift benchmark (the demo): every method side by side on the bundled tiny CLIP, offline: `saeft demo`.

    python recipes/digits.py                         # one seed, all methods, outputs/demo (make demo)
    python recipes/digits.py --seeds 0 1 2 --output_dir outputs/digits-3seeds

The code (and its one parser) is `saeft_hf.commands.demo`; this file runs it from a clone.
"""

import sys

from saeft_hf.commands.demo import main

if __name__ == "__main__":
    main(sys.argv[1:])
