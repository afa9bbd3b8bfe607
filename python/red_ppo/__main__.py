import sys

from red_ppo.cli import main

sys.exit(main())
