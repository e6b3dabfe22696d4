"""`t2i_ds.train`: the main command. Without --preset it is the paper's recipe (`paper_t2i`).

    deepspeed --num_gpus 8 --module t2i_ds.train --ds_config ds_configs/zero2.json \\
        --set data.path=/data/tokens --set train.run_dir=runs/t2i
    torchrun --nproc_per_node 8 -m t2i_ds.train --ds_config ds_configs/zero2.json --set data.path=/data/tokens
    python -m t2i_ds.train --ds_config ds_configs/zero0.json --preset debug      # single process (stage 0)
    python -m t2i_ds.train --ds_config ds_configs/zero2.json --dry-run            # print the resolved config

DeepSpeed's launcher spells Python's `-m` as `--module`; torchrun spells it `-m`.
Bad input (missing or invalid ds_config, unknown preset or field, a value of the wrong type or out of range, no
data path, a batch the world size cannot meet, a data path without token shards, a run directory in use, a
damaged checkpoint with nothing to fall back to, a full disk) ends with one line on stderr and exit status 2.
With several ranks the line is the failing rank's, printed once by rank 0. A JIT build lock left by a killed
build is removed with one line (the op is built again). A resume with nothing left to train (the checkpoint is
at or past train.steps) says so in one line, exits 0 and leaves the run directory as it was.
A node lost or hung mid-run (t2i_ds.trainer.watchdog) ends the survivors within train.collective_timeout_s with one
line naming it and the last complete checkpoint, printed by the lowest surviving rank, and exit status 3.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

from t2i_ds.cli import is_user_error, message_of
from t2i_ds.config import apply_overrides, preset
from t2i_ds.trainer.jit_cache import use_own_cache
from t2i_ds.trainer.rundir import NothingToDo


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
    import t2i_ds.demo.preset  # noqa: F401  (registers the demo preset, and the package its tokenizer kind)
    from t2i_ds.trainer.batching import read_ds_config

    ds_config = read_ds_config(args.ds_config)
    cfg = apply_overrides(preset(args.preset), args.overrides)
    cfg.require_data(args.preset)
    return cfg, ds_config


def _reports(error: BaseException) -> bool:
    """Whether this process prints the error line: an error every rank raised together (agreed) is printed by rank 0;
    one raised before the process group exists is the same on every rank, printed by each node's local rank 0."""
    import torch.distributed as dist

    if getattr(error, "agreed", False) and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    if not (dist.is_available() and dist.is_initialized()):
        return os.environ.get("LOCAL_RANK", "0") == "0"
    return True


def main(argv: list[str] | None = None) -> int:
    use_own_cache()  # DeepSpeed's JIT ops in this environment's cache, also outside `make`
    args = parse_args(argv)
    trainer = None
    try:
        cfg, ds_config = resolve(args)
        if args.dry_run:
            print(json.dumps({"preset": args.preset, "config": cfg.to_dict(), "ds_config": ds_config}, indent=2))
            return 0
        from t2i_ds.trainer.trainer import Trainer

        trainer = Trainer(cfg, ds_config)
        trainer.fit()
    except NothingToDo as e:  # raised before the process group exists: each node's local rank 0 says it
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"[t2i_ds] {e}", flush=True)
        return 0
    except Exception as e:
        if not is_user_error(e) or os.environ.get("T2I_DS_TRACEBACK") == "1":
            raise
        if _reports(e):
            print(f"t2i_ds.train: error: {message_of(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    return 0


def exit_without_teardown(code: int) -> None:
    """End the command once `main` has closed the run (checkpoints, event files, lock, process group): flush, stop
    daemonic children as multiprocessing's exit hook would, and leave without the interpreter's teardown. Native
    threads torn down there (gloo, the rendezvous store, a daemon thread inside a store call) aborted a finished
    rank now and then with "terminate called without an active exception", turning a complete run into a failed
    launch; nothing of the run is left to write at this point."""
    import logging
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.terminate()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    faulthandler.enable()  # a native crash (SIGSEGV, SIGABRT from C++) prints every thread's Python stack first
    exit_without_teardown(main())
