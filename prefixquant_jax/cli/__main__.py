import sys

from prefixquant_jax.cli.main import main

sys.exit(main())
