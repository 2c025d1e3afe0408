import sys

from sd_tasks.cli import main

sys.exit(main())
