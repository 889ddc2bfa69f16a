import sys

from qwen_jax.cli import main

sys.exit(main())
