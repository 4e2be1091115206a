"""Convert an indexed .rec into a shuffled one for the sequential reader (``shuffled_rec=True``).

    python -m partialfc.tools.shuffle_rec IN_DIR OUT_DIR [--seed 0]

IN_DIR holds ``train.rec`` + ``train.idx`` in the insightface layout (header record 0, identity records)
or the plain im2rec layout. OUT_DIR receives a ``train.rec`` with the image records only, in a random
order, plus ``train.idx`` (keys 0..N-1; the sequential reader only uses it to cut the file into chunks)
and ``property``. Records are copied byte for byte (header and image unchanged). Training then reads the
file front to back each epoch (see partialfc.data.SequentialRecordDataset), which is what slow disks
want; this conversion is the one random-access pass.
"""
import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

from partialfc.data import recordio
from partialfc.data.datasets import IndexedRecordDataset
from partialfc.fileio import removed_on_failure, write_atomic
from partialfc.tools import ToolError, run_cli


def shuffle_rec(in_dir, out_dir, seed=0, progress=True):
    rec = os.path.join(in_dir, "train.rec")
    if not os.path.isfile(rec):
        raise ToolError(f"{in_dir!r} has no train.rec")
    ds = IndexedRecordDataset(rec, os.path.join(in_dir, "train.idx"), random_flip=False)
    order = np.random.default_rng(seed).permutation(len(ds))
    if os.path.abspath(out_dir) == os.path.abspath(in_dir):
        raise ToolError("the output folder must differ from the input folder")
    os.makedirs(out_dir, exist_ok=True)
    out_rec, out_idx = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    with removed_on_failure(out_rec, out_rec + ".tmp", out_idx + ".tmp"):  # a full disk leaves no .tmp behind
        writer = recordio.MXIndexedRecordIO(out_idx + ".tmp", out_rec + ".tmp", "w")
        for new_key, i in enumerate(tqdm(order, desc="shuffle_rec", unit="rec", disable=not progress)):
            writer.write_idx(new_key, ds.file.record(ds.offsets[i], int(ds.keys[i])))
        writer.close()
        os.replace(out_rec + ".tmp", out_rec)
        os.replace(out_idx + ".tmp", out_idx)
    write_atomic(os.path.join(out_dir, "property"), lambda f: f.write(f"{ds.num_classes},112,112\n"), mode="w")
    return dict(images=len(ds), num_classes=ds.num_classes, layout=ds.layout)


def main(argv=None):
    """The command line; bad input is one ``error: ...`` line on stderr and exit status 1."""
    return run_cli(_main, argv)


def _main(argv):
    ap = argparse.ArgumentParser(prog="python -m partialfc.tools.shuffle_rec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="folder with train.rec and train.idx")
    ap.add_argument("output", help="output folder for the shuffled train.rec, train.idx and property")
    ap.add_argument("--seed", type=int, default=0, help="seed of the record order")
    args = ap.parse_args(argv)
    stats = shuffle_rec(args.input, args.output, args.seed)
    print(f"wrote {stats['images']} images ({stats['num_classes']} identities, {stats['layout']} input layout) "
          f"in shuffled order to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
