import sys

from sentinel_vllm.cli import main

sys.exit(main())
