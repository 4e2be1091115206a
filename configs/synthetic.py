# The embedded synthetic face-identity dataset with a small backbone: a CPU-sized end-to-end run.
# `bash run.sh` trains it on 2 local processes; a 2-core laptop finishes in a few minutes.
# 1000 training identities x 12 photos; verification on 1000 pairs of 100 held-out identities.
from easydict import EasyDict as edict

config = edict()
config.rec = "synthetic"
config.val_targets = ["synthetic_val"]
config.network = "small"
config.embedding_size = 128
# CosFace with a small margin and scale: a 0.8M-parameter network on 1000 identities learns much faster
# with s=32, m=0.2 than with the large-dataset setting s=64, m=0.4.
config.margin_list = (1.0, 0.0, 0.2)
config.scale = 32.0
config.sample_rate = 1.0
config.batch_size = 64
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.num_epoch = 10
config.warmup_epoch = 0
config.num_workers = 1
config.frequent = 50
config.verbose = 500
config.fp16 = False
config.output = "work_dirs/synthetic"
