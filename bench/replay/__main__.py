import sys

from bench.replay.lab import main

sys.exit(main())
