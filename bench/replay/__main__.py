import sys

if len(sys.argv) > 1 and sys.argv[1] == "live":
    from bench.replay.live import main as live_main

    sys.exit(live_main(sys.argv[2:]))

from bench.replay.lab import main

sys.exit(main())
