"""`t2i_ds.train`: the main command. Without --preset it is the paper's recipe (`paper_t2i`).

    deepspeed --num_gpus 8 --module t2i_ds.train --ds_config ds_configs/zero2.json \\
        --set data.path=/data/tokens --set train.run_dir=runs/t2i
    torchrun --nproc_per_node 8 -m t2i_ds.train --ds_config ds_configs/zero2.json --set data.path=/data/tokens
    python -m t2i_ds.train --ds_config ds_configs/zero2.json --preset debug      # single process
    python -m t2i_ds.train --ds_config ds_configs/zero2.json --dry-run            # print the resolved config

DeepSpeed's launcher spells Python's `-m` as `--module`; torchrun spells it `-m`.
Bad input (missing or invalid ds_config, unknown preset or field, no data path, a batch the world size cannot
meet, a data path without shards) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from t2i_ds.config import ConfigError, apply_overrides, preset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed JSON: ZeRO stage, precision, offload")
    p.add_argument("--preset", default="paper_t2i", help="run preset (t2i_ds.config.PRESETS; default: the paper's recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field; repeatable")
    p.add_argument("--dry-run", action="store_true", help="resolve preset, overrides and ds_config, print them as JSON, train nothing")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the DeepSpeed launcher
    return p.parse_args(argv)


def resolve(args: argparse.Namespace):
    """(Config, ds_config dict) from the command line; ConfigError names what is wrong."""
    import t2i_ds.demo.preset  # noqa: F401  (registers the demo preset)
    from t2i_ds.trainer.batching import read_ds_config

    ds_config = read_ds_config(args.ds_config)
    cfg = apply_overrides(preset(args.preset), args.overrides)
    cfg.require_data(args.preset)
    return cfg, ds_config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, ds_config = resolve(args)
        if args.dry_run:
            print(json.dumps({"preset": args.preset, "config": cfg.to_dict(), "ds_config": ds_config}, indent=2))
            return 0
        from t2i_ds.trainer.trainer import Trainer

        trainer = Trainer(cfg, ds_config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"t2i_ds.train: error: {e}", file=sys.stderr)
        return 2
    from t2i_ds.data.loader import BrokenDataError

    try:
        trainer.fit()
    except BrokenDataError as e:  # damaged shards: the loader names the shard; no traceback wall
        print(f"t2i_ds.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
