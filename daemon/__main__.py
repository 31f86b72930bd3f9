import sys

from daemon.cli import main

# Guarded: build workers are spawned processes, which import the parent's __main__ module.
if __name__ == "__main__":
    sys.exit(main())
