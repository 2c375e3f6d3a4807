"""`python -m vitcnn.study ...`: the same as `vitcnn study ...`."""

import sys

from vitcnn.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
