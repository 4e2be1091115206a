"""Clean a training set with a sub-center ArcFace run (num_subcenters = K > 1), as Deng et al. (ECCV 2020) do.

    python -m partialfc.tools.subcenter_clean RUN_DIR OUT_DIR [--rec DIR] [--threshold 75] [--batch-size 256]
                                              [--write-rec]

``RUN_DIR`` is a finished run's output folder (``model.pt``, ``config.json``, ``softmax_fc_rank_<r>.pt``) or a
checkpoint (a ``checkpoints/step_<N>`` folder, or an output folder without final files: its newest sealed
checkpoint). The training set is the run's ``rec`` (``--rec`` names another folder of the same identities). Every
sample is embedded with the trained backbone (no flip); each identity's dominant sub-center is the one most of
its samples are nearest to (ties: the lowest k); a sample whose angle to its identity's dominant sub-center is
above ``--threshold`` degrees is dropped. Written to ``OUT_DIR``:

- ``kept_samples.txt``: the positions of the kept samples in the training set, one a line, after a ``# samples:
  N`` line; train on them with ``train_index=OUT_DIR/kept_samples.txt`` (same ``rec``);
- ``clean_report.json``: the counts (samples and identities, kept and dropped), the threshold, percentiles of
  the samples' angles to their dominant sub-centers (``angle_percentiles_deg``: where the threshold cuts), and
  per identity its samples, kept samples and dominant sub-center. The summary is printed too;
- with ``--write-rec`` (a .rec training set only): ``train.rec`` + ``train.idx`` holding the kept samples'
  records byte for byte, in their order, in the plain im2rec layout (keys 0..M-1), ``property`` with the
  set's class count, and a copy of the set's ``*.bin`` verification sets: train on it with ``rec=OUT_DIR``.
  Labels are not renumbered, so the class count stays the set's; an identity that lost every sample keeps its
  label (its centers are then only ever negatives). When the last identities lost every sample the labels no
  longer reach the count in ``property``, and training needs ``num_classes`` set to it (the tool says so).

docs/cleaning.md walks through a cleaning run and gives the figures measured on the synthetic identities.
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from partialfc.config import Config, default_config, validate
from partialfc.tools import ToolError, run_cli

ANGLE_PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
_FINAL_SHARD = re.compile(r"^softmax_fc_rank_(\d+)\.pt$")


def read_final_centers(run_dir):
    """``(weight [C*K, D], K, num_classes)`` from a finished run's ``softmax_fc_rank_<r>.pt`` files, or None
    when there are none."""
    found = {int(m.group(1)): os.path.join(run_dir, n) for n in os.listdir(run_dir) if (m := _FINAL_SHARD.match(n))}
    if not found:
        return None
    world_size = max(found) + 1
    missing = [f"softmax_fc_rank_{r}.pt" for r in range(world_size) if r not in found]
    shards = []
    for rank, path in sorted(found.items()):
        shard = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(shard, dict) or not isinstance(shard.get("weight"), torch.Tensor):
            raise ToolError(f"{path}: not a class-center shard (no 'weight' tensor)")
        world_size = max(world_size, int(shard.get("world_size") or 0))
        shards.append((int(shard.get("class_start", 0)), path, shard))
    missing += [f"softmax_fc_rank_{r}.pt" for r in range(max(found) + 1, world_size)]
    if missing:
        raise ToolError(f"{run_dir}: {', '.join(missing)} missing (found {sorted(found)}); every rank's shard is "
                        f"needed")
    shards.sort(key=lambda s: s[0])
    ks = {int(s.get("num_subcenters", 1)) for _, _, s in shards}
    if len(ks) != 1:
        raise ToolError(f"{run_dir}: the shards hold different num_subcenters {sorted(ks)}")
    k = ks.pop()
    expect = 0
    for start, path, shard in shards:
        if start != expect or shard["weight"].shape[0] % k:
            raise ToolError(f"{path}: starts at class {start} with {shard['weight'].shape[0]} rows, expected class "
                            f"{expect} and a multiple of num_subcenters = {k}")
        expect += shard["weight"].shape[0] // k
    num_classes = int(shards[0][2].get("num_classes") or expect)
    if num_classes != expect:
        raise ToolError(f"{run_dir}: the shards hold {expect} classes, but they say num_classes = {num_classes}")
    return torch.cat([s["weight"] for _, _, s in shards]).float(), k, num_classes


def load_run(run_dir):
    """``(config, backbone state_dict, centers [C*K, D], K, num_classes, what)`` of a run folder or checkpoint."""
    if not os.path.isdir(run_dir):
        raise ToolError(f"run folder {run_dir!r} does not exist")
    final = read_final_centers(run_dir)
    if final is not None:
        config_path, model_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "model.pt")
        for path in (config_path, model_path):
            if not os.path.isfile(path):
                raise ToolError(f"{path} is missing (the run's final files are incomplete)")
        with open(config_path) as f:
            config = json.load(f)
        backbone = torch.load(model_path, map_location="cpu", weights_only=True)
        weight, k, num_classes = final
        what = f"{run_dir} (final class centers)"
    else:
        from partialfc.engine import reshard
        try:
            merged = reshard.merge(run_dir)
        except reshard.ReshardError as exc:
            raise ToolError(f"{run_dir}: no softmax_fc_rank_<r>.pt and no usable checkpoint ({exc})") from None
        config = json.loads(merged["trainer"].get("config") or "{}")
        backbone = merged["trainer"]["backbone"]
        weight, k, num_classes = merged["weight"].float(), int(merged.get("num_subcenters", 1)), merged["num_classes"]
        what = f"{run_dir} (checkpoint at step {merged['trainer'].get('step')})"
    if k == 1:
        raise ToolError(f"{what} was trained with num_subcenters = 1: cleaning needs the sub-centers of a run with "
                        f"num_subcenters > 1 (the paper uses 3)")
    return config, backbone, weight, k, num_classes, what


def run_config(saved, rec=None):
    config = default_config()
    config.update({key: value for key, value in saved.items() if key in config})
    if rec is not None:
        config["rec"] = rec
    config["train_index"] = None  # every sample of the set is scored
    return validate(Config(config))


@torch.no_grad()
def embed_dataset(backbone, dataset, batch_size, num_workers=0):
    """``(embeddings [N, D] normalized, labels [N])`` of every sample, in dataset order, without flips."""
    if hasattr(dataset, "random_flip"):
        dataset.random_flip = False
    from partialfc.data.loader import collate
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate)
    feats, labels = [], []
    for images, y in loader:
        feats.append(F.normalize(backbone(images).float(), dim=1))
        labels.append(y.long())
    return torch.cat(feats), torch.cat(labels)


def clean(embeddings, labels, centers, k, threshold_deg=75.0):
    """Per sample ``(keep [N] bool, angle [N] degrees)`` and per identity ``(dominant [C], count [C])``.

    ``centers`` [C*K, D]; a sample's angle is the one to its identity's dominant sub-center, the sub-center most
    of the identity's samples are nearest to (ties: the lowest k)."""
    num_classes = centers.shape[0] // k
    w = F.normalize(centers.float(), dim=1).view(num_classes, k, -1)  # [C, K, D]
    cos = torch.einsum("nd,nkd->nk", embeddings.float(), w[labels])  # [N, K]
    nearest = cos.argmax(dim=1)  # [N]
    votes = torch.zeros(num_classes, k, dtype=torch.long).index_put_((labels, nearest), torch.ones_like(labels),
                                                                      accumulate=True)  # [C, K]
    dominant = votes.argmax(dim=1)  # first max: the lowest k on a tie
    angle = torch.rad2deg(torch.acos(cos[torch.arange(len(labels)), dominant[labels]].clamp(-1, 1)))
    return angle <= threshold_deg, angle, dominant, votes.sum(dim=1)


def write_kept_rec(dataset, kept, out_dir):
    """Copy the records of ``dataset`` (an ``IndexedRecordDataset``) at positions ``kept`` byte for byte into
    ``out_dir/train.rec`` + ``train.idx`` + ``property``, with the set's ``*.bin`` verification sets; the
    ``train.rec`` path."""
    from partialfc.data import recordio
    from partialfc.data.noisy import copy_verification_sets, write_plain_rec

    def records():
        for i in kept.tolist():
            record = dataset.file.record(dataset.offsets[i], int(dataset.keys[i]))
            label = recordio.split_label(record)[0]
            if label != int(dataset.labels[i]):
                # an insightface-layout set whose identity records disagree with the image's own header: the
                # copy, read by its headers, would train another label than the one the run was scored on
                raise ToolError(f"record key {int(dataset.keys[i])} of {dataset.path!r} has label {label} in its "
                                f"header, but its identity record says {int(dataset.labels[i])}: rebuild the set")
            yield record

    write_plain_rec(out_dir, records(), dataset.num_classes)
    copy_verification_sets(os.path.dirname(dataset.path), out_dir)
    return os.path.join(out_dir, "train.rec")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m partialfc.tools.subcenter_clean",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run's output folder, or a checkpoint")
    parser.add_argument("out_dir", help="where kept_samples.txt and clean_report.json go")
    parser.add_argument("--rec", default=None, help="the training set (default: the run's config rec)")
    parser.add_argument("--threshold", type=float, default=75.0,
                        help="drop samples further than this many degrees from their dominant sub-center (75)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--write-rec", action="store_true",
                        help="also write OUT_DIR/train.rec + train.idx + property holding the kept samples' records")
    args = parser.parse_args(argv)
    if not 0 < args.threshold <= 180:
        raise ToolError(f"--threshold must be in (0, 180] degrees, got {args.threshold}")
    saved, state, centers, k, num_classes, what = load_run(args.run_dir)
    config = run_config(saved, args.rec)
    from partialfc.backbones import build_backbone
    from partialfc.data.loader import build_dataset
    dataset, kind = build_dataset(config)
    if kind not in ("synthetic", "indexed", "folder"):
        raise ToolError(f"rec = {config.rec!r} ({kind}): cleaning needs an indexed training set (synthetic, a "
                        f".rec with its .idx, or an image folder), not shuffled_rec")
    if args.write_rec and kind != "indexed":
        raise ToolError(f"--write-rec copies the records of a .rec training set, and rec = {config.rec!r} is "
                        f"{'the synthetic set' if kind == 'synthetic' else 'an image folder'}: train on the kept "
                        f"samples with train_index=OUT_DIR/kept_samples.txt instead")
    if args.write_rec and os.path.abspath(os.path.dirname(dataset.path)) == os.path.abspath(args.out_dir):
        raise ToolError(f"OUT_DIR {args.out_dir!r} holds the training set itself: --write-rec needs another folder")
    if int(dataset.num_classes) != num_classes:
        raise ToolError(f"{what} has {num_classes} identities, but the training set {config.rec!r} has "
                        f"{int(dataset.num_classes)}: clean the set the run was trained on")
    backbone = build_backbone(config)
    backbone.load_state_dict(state)
    backbone.eval()
    embeddings, labels = embed_dataset(backbone, dataset, args.batch_size)
    keep, angle, dominant, count = clean(embeddings, labels, centers, k, args.threshold)
    kept = torch.nonzero(keep).flatten()
    kept_per_id = torch.bincount(labels[keep], minlength=num_classes)
    os.makedirs(args.out_dir, exist_ok=True)
    from partialfc.fileio import write_atomic
    index_path = os.path.join(args.out_dir, "kept_samples.txt")
    text = f"# samples: {len(labels)}\n" + "".join(f"{int(i)}\n" for i in kept)
    write_atomic(index_path, lambda f: f.write(text.encode()))
    report = dict(run=os.path.abspath(args.run_dir), rec=config.rec, num_subcenters=k, threshold_deg=args.threshold,
                  samples=len(labels), kept=len(kept), dropped=len(labels) - len(kept), identities=num_classes,
                  identities_with_samples=int((count > 0).sum()),
                  identities_dropped=int(((count > 0) & (kept_per_id == 0)).sum()), train_index=index_path,
                  # where the threshold cuts: the spread of every sample's angle to its dominant sub-center
                  angle_percentiles_deg={str(q): round(float(v), 2) for q, v in
                                         zip(ANGLE_PERCENTILES, np.percentile(angle.numpy(), ANGLE_PERCENTILES))},
                  per_identity={str(c): dict(samples=int(count[c]), kept=int(kept_per_id[c]),
                                             dominant_subcenter=int(dominant[c]))
                                for c in range(num_classes) if count[c] > 0})
    if args.write_rec:
        report["cleaned_rec"] = write_kept_rec(dataset, kept, args.out_dir)
        top = int(labels[keep].max()) + 1 if len(kept) else 0
        # the plain layout's labels then stop short of the class count in property: the loader asks for it
        report["cleaned_rec_needs_num_classes"] = top < num_classes
    report_path = os.path.join(args.out_dir, "clean_report.json")
    write_atomic(report_path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"{what}: {len(labels)} samples of {report['identities_with_samples']} identities, K = {k}; kept "
          f"{len(kept)}, dropped {report['dropped']} ({100.0 * report['dropped'] / max(1, len(labels)):.1f}%) beyond "
          f"{args.threshold:g} degrees of their dominant sub-center; {report['identities_dropped']} identities lost "
          f"every sample. Wrote {index_path} (train with train_index={index_path}) and {report_path}")
    if args.write_rec:
        print(f"Wrote the kept samples' records to {report['cleaned_rec']} (train with rec={args.out_dir}"
              + (f" num_classes={num_classes}: identities from {top} on lost every sample, so the labels no longer "
                 f"show the class count" if report["cleaned_rec_needs_num_classes"] else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
