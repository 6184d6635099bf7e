"""DVC stage `pretrain` (frozen): distil the offline EfficientNet-Lite0 into a ViT; writes weights/<pretrain.name>.*.

Its outputs are committed, so a fresh clone trains on them without running this stage (see dvc.yaml). The work
folder keeps the resumable state: a killed run continues from its last checkpoint.
"""

import sys

from pipeline.config import load_params
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    from pipeline.pretrain import run as pretrain  # imports torch: after params are known to be valid

    pretrain.main(args, params, root)


if __name__ == "__main__":
    from pipeline.pretrain.run import add_arguments

    parser = stage_parser(__doc__)
    add_arguments(parser)
    sys.exit(run(main, parser, load_params))
