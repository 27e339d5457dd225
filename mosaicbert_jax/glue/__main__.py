"""Command line: python -m mosaicbert_jax.glue --config=configs/glue.py --config.checkpoint=DIR"""

from absl import app, flags, logging
from ml_collections import config_flags

from mosaicbert_jax.cli_errors import run_absl_app, run_main
from mosaicbert_jax.glue.runner import run_glue
from mosaicbert_jax.xla_flags import apply_gpu_defaults

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "GLUE config file (configs/glue.py); override keys with --config.KEY=...")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.KEY=...")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/glue.py")
    apply_gpu_defaults()  # before the first computation initialises the backend
    if not flags.FLAGS["verbosity"].present:  # keep Orbax's INFO chatter off the console
        logging.set_verbosity(logging.WARNING)
    run_main(run_glue, _CONFIG.value)  # a user's mistake: one `error:` line, exit 2


if __name__ == "__main__":
    run_absl_app(main)
