"""Merge, split and import class-center checkpoints.

    python -m partialfc.tools.reshard merge CHECKPOINT_DIR OUT.pt
    python -m partialfc.tools.reshard split IN.pt --world-size N OUT_DIR
    python -m partialfc.tools.reshard import-arcface-torch RUN_DIR OUT_DIR --world-size N

``merge`` reads a checkpoint folder (``OUTPUT/checkpoints/step_<N>``, or an output folder: its newest sealed
checkpoint) and writes one file with the whole center table, every per-row optimizer state and the trainer
state. ``split`` writes such a file as a resumable checkpoint of N ranks under ``OUT_DIR/checkpoints/step_<N>``
(train with ``output=OUT_DIR resume=True``). ``import-arcface-torch`` does the same from an arcface_torch run
folder (``checkpoint_gpu_<r>.pt``, or ``model.pt`` + ``softmax_fc_gpu_<r>.pt``). Training itself re-splits a
checkpoint for any number of ranks at resume; these are for moving runs between tools and machines.
"""
import argparse
import sys

from partialfc.engine import reshard
from partialfc.engine.checkpointer import save_atomic
from partialfc.eval.model_io import CheckpointError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m partialfc.tools.reshard", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="one file with the whole table and per-row optimizer states")
    merge.add_argument("checkpoint_dir")
    merge.add_argument("out")
    split = sub.add_parser("split", help="a merged file as a resumable checkpoint for N ranks")
    split.add_argument("input")
    split.add_argument("out_dir")
    split.add_argument("--world-size", type=int, required=True)
    imp = sub.add_parser("import-arcface-torch", help="an arcface_torch run as a resumable checkpoint")
    imp.add_argument("run_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--world-size", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            merged = reshard.merge(args.checkpoint_dir)
            save_atomic(merged, args.out)
            print(f"wrote {args.out}: {merged['num_classes']} classes x {merged['embedding_size']} from "
                  f"{merged['source_world_size']} ranks, center optimizer state {sorted(merged['optimizer_rows'])}")
        elif args.command == "split":
            reshard.split(reshard.load_merged(args.input), args.world_size, args.out_dir)
        else:
            reshard.import_arcface_torch(args.run_dir, args.out_dir, args.world_size)
    except (reshard.ReshardError, CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
