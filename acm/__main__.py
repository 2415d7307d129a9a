"""``python -m acm`` entry point."""

import sys

from acm.cli import main

if __name__ == "__main__":
    sys.exit(main())
